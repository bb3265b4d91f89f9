"""A validation split carved from the training examples before they are partitioned.

ComPEFT (Yadav et al. 2023, arXiv 2311.13171, §4) chooses its magnitude scale γ on a validation
set, never on the test set; ``--validation-fraction f`` gives fedpeft one. The carve is
stratified by label and fixed by :data:`VALIDATION_SEED` (like the test split, it does not move
with ``--seed``), so every run of a grid and every seed is scored on the same rows and the
clients' partitions are drawn from the same remaining pool.

The rows stay in the workspace's train split (its token ids, cached features or cached frozen
bottom are computed once, as before); what changes is which rows exist for the clients: the
partitions are built over :attr:`Holdout.train_rows` only, so no client ever holds a validation
row, and the server scores the global model on :attr:`Holdout.validation` (a
:class:`RowSubset` view). Under DP that score is, like the test accuracy, a function of the
released model and of rows no client holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.data.sources import SPLIT_SEED, stratified_indices
from fedpeft.data.tokenized import collate

#: fixed, and different from the test split's seed: which rows validate must not move with --seed
VALIDATION_SEED = SPLIT_SEED + 1


@dataclass
class RowSubset:
    """The rows ``rows`` of ``split`` as a split of their own (for evaluation: length, labels,
    batches), whatever kind ``split`` is (token ids, cached features, cached hidden states)."""

    split: Any
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.split.labels)[self.rows]

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.split.lengths)[self.rows]

    def collate(self, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        return collate(self.split, self.rows[np.asarray(rows, dtype=np.int64)], pad_id)


@dataclass(frozen=True)
class Holdout:
    """Which training rows the clients' partitions are drawn from, and which validate."""

    #: sorted train-split rows the partitions are built over
    train_rows: np.ndarray
    #: the held-out rows, in the order the stratified carve drew them
    validation_rows: np.ndarray


def carve_validation(labels: np.ndarray, fraction: float) -> Holdout | None:
    """``ceil(fraction · n)`` training rows held out with the label proportions of the whole
    (None for ``fraction`` 0: every row goes to the clients, as without this option)."""
    if fraction == 0:
        return None
    kept, held_out = stratified_indices(np.asarray(labels), fraction, VALIDATION_SEED, what="validation")
    return Holdout(train_rows=np.sort(kept), validation_rows=held_out)


__all__ = ["VALIDATION_SEED", "Holdout", "RowSubset", "carve_validation"]
