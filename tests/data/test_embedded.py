"""The embedded offline datasets match the facts in STACK.md."""

from __future__ import annotations

from fedpeft.data.embedded import bbc_news, rotten_tomatoes
from fedpeft.data.sources import load_splits


def test_rotten_tomatoes_counts_and_majority_rate():
    ds = rotten_tomatoes()
    assert len(ds) == 12808
    fresh = sum(ds["label"]) / len(ds)
    assert abs(fresh - 0.578) < 0.001
    assert ds.features["label"].names == ["rotten", "fresh"]


def test_bbc_news_five_classes():
    ds = bbc_news()
    assert len(ds) == 2225
    counts = {n: 0 for n in ds.features["label"].names}
    for y in ds["label"]:
        counts[ds.features["label"].names[y]] += 1
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401} or \
        counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


def test_test_split_is_fixed_and_disjoint():
    a = load_splits("rotten-tomatoes", "text", "label", 0.1, 2000)
    assert len(a.test) == 1281 and len(a.train) == 12808 - 1281
    b = load_splits.__wrapped__("rotten-tomatoes", "text", "label", 0.1, 2000)
    assert a.test["text"] == b.test["text"]  # same held-out split on every call/run
