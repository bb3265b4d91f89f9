"""Partitions are disjoint and cover the train split (flwr-datasets partitioners)."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from fedpeft.data.partition import Partitions


def _toy(n=1000, classes=4):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n).tolist()
    feats = Features({"text": Value("string"), "label": ClassLabel(num_classes=classes)})
    return Dataset.from_dict({"text": [str(i) for i in range(n)], "label": labels}, features=feats)


@pytest.mark.parametrize("scheme,num", [("iid", 7), ("iid", 1000), ("dirichlet", 10), ("dirichlet", 300)])
def test_partitions_disjoint_and_covering(scheme, num):
    ds = _toy()
    parts = Partitions(ds, scheme, num, "label", dirichlet_alpha=0.3, seed=1)
    all_rows = np.concatenate([parts.indices(i) for i in range(num)])
    assert len(all_rows) == len(ds)  # covering, no duplicates below
    assert len(np.unique(all_rows)) == len(ds)


def test_dirichlet_skews_labels_more_than_iid():
    ds = _toy(4000)
    labels = np.asarray(ds["label"])

    def skew(scheme):
        p = Partitions(ds, scheme, 20, "label", dirichlet_alpha=0.1, seed=3)
        # mean total-variation distance of client label histograms from the global one
        glob = np.bincount(labels, minlength=4) / len(labels)
        tv = []
        for i in range(20):
            rows = p.indices(i)
            if len(rows):
                h = np.bincount(labels[rows], minlength=4) / len(rows)
                tv.append(0.5 * np.abs(h - glob).sum())
        return float(np.mean(tv))

    assert skew("dirichlet") > 3 * skew("iid")


def test_partition_id_out_of_range():
    parts = Partitions(_toy(), "iid", 5, "label", dirichlet_alpha=1.0, seed=0)
    with pytest.raises(IndexError):
        parts.indices(5)


def test_iid_with_more_clients_than_rows_gives_empty_clients():
    """N beyond the row count is legal: the first len(train) clients get one row, the rest none."""
    from datasets import Dataset

    from fedpeft.data.partition import Partitions, iid_size

    train = Dataset.from_dict({"label": [0, 1, 0, 1, 1]})
    parts = Partitions(train, "iid", 8, "label", 0.5, 0)
    sizes = [len(parts.indices(i)) for i in range(8)]
    assert sizes == [1, 1, 1, 1, 1, 0, 0, 0] == [iid_size(5, 8, i) for i in range(8)]
    assert sorted(np.concatenate([parts.indices(i) for i in range(8)]).tolist()) == list(range(5))
    # and the formula is flwr-datasets' own split where that one works
    parts3 = Partitions(train, "iid", 3, "label", 0.5, 0)
    assert [len(parts3.indices(i)) for i in range(3)] == [iid_size(5, 3, i) for i in range(3)] == [2, 2, 1]
