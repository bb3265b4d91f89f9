"""Personalized evaluation: a client's own model on a test set shaped like its own data.

FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463, §4) reports the accuracy of each
client's personalized model — shared ``A`` and head, the client's own ``B`` — on that
client's local test data, which under label skew follows the client's label distribution.
fedpeft's partitions only split the training data, so a client's local test set is drawn
from the central test split with the label proportions of the rows the client trains on.
The draw depends only on the seed it is given (fedpeft: run seed and client), so a client
is evaluated on the same examples in every round it is sampled.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from fedpeft.data.tokenized import TokenizedSplit, collate
from fedpeft.training.evaluate import EvalResult, evaluate

#: examples in a client's local test set (fewer when the test split is smaller)
LOCAL_TEST_SIZE = 64
EVAL_BATCH = 64


def label_quota(train_labels: np.ndarray, size: int, num_labels: int) -> np.ndarray:
    """Examples per label for a test set of ``size`` with ``train_labels``' proportions.

    Largest-remainder rounding (ties to the smaller label): every count is within one
    example of ``p_c · size`` and the counts sum to ``size``.
    """
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_labels)
    if counts.sum() == 0 or size <= 0:
        return np.zeros(num_labels, dtype=np.int64)
    exact = counts / counts.sum() * size
    quota = np.floor(exact).astype(np.int64)
    short = size - int(quota.sum())
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:short]] += 1
    return quota


def local_test_rows(train_labels: np.ndarray, test_labels: np.ndarray, size: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Sorted rows of the test split whose label mix follows ``train_labels``.

    ``size`` is capped at the test split's length. A label the test split has too few rows
    of contributes all it has (the set is then smaller than ``size``; no other label is
    padded up, which would distort the proportions).
    """
    test_labels = np.asarray(test_labels, dtype=np.int64)
    num_labels = int(max(np.max(train_labels, initial=-1), np.max(test_labels, initial=-1))) + 1
    quota = label_quota(train_labels, min(size, len(test_labels)), num_labels)
    picked = []
    for label, want in enumerate(quota):
        pool = np.flatnonzero(test_labels == label)
        take = min(int(want), len(pool))
        if take:
            picked.append(rng.choice(pool, size=take, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def evaluate_rows(model: nn.Module, split: TokenizedSplit, rows: np.ndarray, pad_id: int) -> EvalResult:
    """Loss and accuracy of ``model`` on ``rows`` of ``split`` (length-sorted batches)."""
    order = rows[np.argsort(split.lengths[rows], kind="stable")]
    batches = (collate(split, order[i : i + EVAL_BATCH], pad_id) for i in range(0, len(order), EVAL_BATCH))
    return evaluate(model, batches)
