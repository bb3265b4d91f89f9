"""The held-out split is the one datasets' ``train_test_split(stratify_by_column=...)`` draws —
same rows, same order — only faster; a single-example class is a usage error."""

from __future__ import annotations

import pytest
from datasets import ClassLabel, Dataset, Features, Value

from fedpeft.data.embedded import EMBEDDED
from fedpeft.data.sources import SPLIT_SEED, stratified_split
from fedpeft.errors import UsageError


@pytest.mark.parametrize("name,fraction", [("rotten-tomatoes", 0.1), ("bbc-news", 0.2), ("bbc-news", 0.0337)])
def test_same_rows_as_datasets_own_stratified_split(name: str, fraction: float) -> None:
    ds = EMBEDDED[name]()
    ref = ds.train_test_split(test_size=fraction, seed=SPLIT_SEED, stratify_by_column="label")
    train, test = stratified_split(ds, "label", fraction)
    for mine, theirs in ((train, ref["train"]), (test, ref["test"])):
        assert len(mine) == len(theirs)
        assert mine["text"][:] == theirs["text"][:]
        assert list(mine["label"][:]) == list(theirs["label"][:])


def test_a_shuffled_view_is_split_by_its_logical_rows() -> None:
    """A dataset with an indices mapping (after shuffle/select) must be read in its own order."""
    ds = EMBEDDED["bbc-news"]().shuffle(seed=3).select(range(500))
    ref = ds.train_test_split(test_size=0.1, seed=SPLIT_SEED, stratify_by_column="label")
    train, test = stratified_split(ds, "label", 0.1)
    assert test["text"][:] == ref["test"]["text"][:] and train["text"][:] == ref["train"]["text"][:]


def test_a_class_with_one_example_cannot_be_stratified() -> None:
    ds = Dataset.from_dict({"text": ["a", "b", "c", "d", "e"], "label": [0, 0, 0, 0, 1]},
                           features=Features({"text": Value("string"), "label": ClassLabel(names=["x", "y"])}))
    with pytest.raises(UsageError, match="single example"):
        stratified_split(ds, "label", 0.4)
