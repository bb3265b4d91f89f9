"""``--dataset synthetic:<rows>``: every client gets data, and nothing can be learned from it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedpeft.config import RunConfig
from fedpeft.data.partition import Partitions
from fedpeft.data.sources import load_splits
from fedpeft.data.synthetic import WARNING, synthetic
from fedpeft.errors import UsageError
from fedpeft.planning.forecast import config_plan


def test_rows_labels_and_every_client_has_data():
    ds = synthetic("synthetic:5000")
    assert len(ds) == 5000 and ds.features["label"].names == ["synthetic-0", "synthetic-1"]
    lengths = np.array([len(t.split()) for t in ds["text"]])
    assert lengths.min() >= 8 and lengths.max() <= 30
    parts = Partitions(ds, "iid", 5000, "label", 0.5, 0)
    assert all(len(parts.indices(i)) == 1 for i in (0, 2500, 4999))
    # labels independent of the text: a word's label rate is the base rate (chi-square over
    # the 50 most frequent words' label counts)
    labels = np.array(ds["label"])
    words = {}
    for text, y in zip(ds["text"], labels):
        for w in set(text.split()):
            words.setdefault(w, [0, 0])[y] += 1
    top = sorted(words.values(), key=sum, reverse=True)[:50]
    p = labels.mean()
    chi2 = sum((c[1] - sum(c) * p) ** 2 / (sum(c) * p * (1 - p)) for c in top)
    assert stats.chi2.sf(chi2, df=50) > 1e-4


@pytest.mark.parametrize("name", ["synthetic:0", "synthetic:x", "synthetic:-5", "synthetic:99999999999"])
def test_bad_row_counts_are_refused(name):
    with pytest.raises(UsageError, match="row count must be an integer"):
        load_splits(name, "text", "label", 0.1, 100)


def test_plan_warns_that_accuracy_means_nothing():
    cfg = RunConfig(dataset="synthetic:1000", clients=1000)
    assert WARNING in config_plan(cfg, {"w": (4,)}, 900, None, None).warnings
    assert WARNING not in config_plan(RunConfig(), {"w": (4,)}, 900, None, None).warnings
