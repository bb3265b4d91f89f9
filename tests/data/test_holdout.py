"""The validation split (``--validation-fraction``): the rows datasets' own stratified
``train_test_split`` would hold out, never in any client's partition, evaluated as a split of
its own; bad fractions are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value

from fedpeft.data.holdout import VALIDATION_SEED, RowSubset, carve_validation
from fedpeft.data.partition import Partitions
from fedpeft.data.tokenized import TokenizedSplit, collate, eval_batches
from fedpeft.errors import UsageError


def _toy(n: int = 600, classes: int = 3) -> Dataset:
    labels = np.random.default_rng(5).integers(0, classes, n).tolist()
    feats = Features({"text": Value("string"), "label": ClassLabel(num_classes=classes)})
    return Dataset.from_dict({"text": [f"row {i}" for i in range(n)], "label": labels}, features=feats)


def test_fraction_zero_holds_nothing_out():
    assert carve_validation(np.array([0, 1, 0, 1]), 0.0) is None


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_the_held_out_rows_are_datasets_own_stratified_split(fraction):
    ds = _toy()
    holdout = carve_validation(np.asarray(ds["label"]), fraction)
    # the independent reference: datasets' train_test_split with the same seed
    ref = ds.train_test_split(test_size=fraction, seed=VALIDATION_SEED, stratify_by_column="label")
    assert [ds["text"][i] for i in holdout.validation_rows] == ref["test"]["text"]
    assert sorted(ds["text"][i] for i in holdout.train_rows) == sorted(ref["train"]["text"])
    assert len(holdout.validation_rows) == int(np.ceil(fraction * len(ds)))
    assert np.intersect1d(holdout.train_rows, holdout.validation_rows).size == 0
    assert np.array_equal(np.sort(np.concatenate([holdout.train_rows, holdout.validation_rows])), np.arange(len(ds)))


@pytest.mark.parametrize("scheme,clients", [("iid", 7), ("dirichlet", 10)])
def test_no_partition_holds_a_validation_row_and_together_they_hold_the_rest(scheme, clients):
    ds = _toy()
    holdout = carve_validation(np.asarray(ds["label"]), 0.2)
    parts = Partitions(ds, scheme, clients, "label", dirichlet_alpha=0.3, seed=1, rows=holdout.train_rows)
    held = np.concatenate([parts.indices(i) for i in range(clients)])
    assert np.intersect1d(held, holdout.validation_rows).size == 0
    assert np.array_equal(np.sort(held), holdout.train_rows)  # disjoint and covering the pool
    assert parts.sizes().sum() == len(holdout.train_rows)
    if scheme == "dirichlet":  # the partitions' labels are the rows' own labels
        labels = np.asarray(ds["label"])
        assert any(len(np.unique(labels[parts.indices(i)])) < 3 for i in range(clients) if len(parts.indices(i)))


def test_a_row_subset_evaluates_exactly_its_rows():
    split = TokenizedSplit(input_ids=[np.arange(1, k + 2, dtype=np.int32) for k in range(10)],
                           labels=np.arange(10) % 3)
    rows = np.array([7, 2, 9, 4])
    sub = RowSubset(split, rows)
    assert len(sub) == 4 and list(sub.labels) == [1, 2, 0, 1] and list(sub.lengths) == [8, 3, 10, 5]
    batches = list(eval_batches(sub, 3, pad_id=0))
    seen = torch.cat([b["labels"] for b in batches]).tolist()
    assert sorted(seen) == sorted(split.labels[rows].tolist())
    expected = collate(split, np.array([2, 4]), pad_id=0)  # sub rows 1 and 3, shortest first
    first = sub.collate(np.array([1, 3]), pad_id=0)
    assert all(torch.equal(first[k], expected[k]) for k in expected)


@pytest.mark.parametrize("value", [0.5, -0.1, float("nan")])
def test_a_bad_fraction_is_refused_in_one_line(value):
    from fedpeft.config import RunConfig
    from fedpeft.settings import validate

    with pytest.raises(UsageError) as info:
        validate(RunConfig(validation_fraction=value, backend="inprocess"))
    message = str(info.value)
    assert f"--validation-fraction {value!r}" in message and "[0, 0.5)" in message and "\n" not in message


def test_a_task_whose_evaluation_cannot_score_train_rows_refuses_the_option():
    from fedpeft.config import RunConfig
    from fedpeft.settings import validate

    with pytest.raises(UsageError) as info:
        validate(RunConfig(task="causal-lm", validation_fraction=0.1, backend="inprocess"))
    assert "--validation-fraction 0.1 is invalid; allowed: 0 with --task causal-lm" in str(info.value)
