"""The 3-client FFA-LoRA label skew: proportions [0.1,0.9]/[0.9,0.1]/[0.5,0.5], disjoint."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from fedpeft.data.partition import Partitions
from fedpeft.errors import UsageError


def _toy(n=2000, classes=2, p1=0.58):
    rng = np.random.default_rng(0)
    if classes == 2:
        labels = (rng.random(n) < p1).astype(int).tolist()
    else:
        labels = rng.integers(0, classes, n).tolist()
    feats = Features({"text": Value("string"), "label": ClassLabel(num_classes=classes)})
    return Dataset.from_dict({"text": [str(i) for i in range(n)], "label": labels}, features=feats)


def test_ffa_skew_label_proportions_and_disjoint():
    ds = _toy()
    labels = np.asarray(ds["label"])
    parts = Partitions(ds, "ffa-skew", 3, "label", dirichlet_alpha=0.5, seed=4)
    rows = [parts.indices(i) for i in range(3)]
    for r, want0 in zip(rows, (0.1, 0.9, 0.5)):
        assert len(r) > 100
        assert abs(np.mean(labels[r] == 0) - want0) <= 0.02
        assert abs(np.mean(labels[r] == 1) - (1 - want0)) <= 0.02
    allr = np.concatenate(rows)
    assert len(np.unique(allr)) == len(allr)  # disjoint
    assert len({len(r) for r in rows}) == 1  # equal sizes


def test_ffa_skew_refuses_other_client_counts_and_multiclass():
    with pytest.raises(UsageError):
        Partitions(_toy(), "ffa-skew", 4, "label", dirichlet_alpha=0.5, seed=0)
    parts = Partitions(_toy(classes=5), "ffa-skew", 3, "label", dirichlet_alpha=0.5, seed=0)
    with pytest.raises(UsageError):
        parts.indices(0)
