"""Tokenise once, batch many times.

Texts are tokenised a single time per process (no padding) and kept as a list of id arrays;
batches are padded only to their own longest row, which on short review snippets halves the
compute against padding to ``max_length``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TokenizedSplit:
    input_ids: list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def tokenize(texts: Sequence[str], labels: Sequence[int], tokenizer, max_length: int) -> TokenizedSplit:  # noqa: ANN001
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
    return TokenizedSplit(input_ids=ids, labels=np.asarray(labels, dtype=np.int64))


def collate(split, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """A batch of ``rows``: token ids padded to the longest among them, or, for a
    :class:`fedpeft.data.features.FeatureSplit`, its cached head features."""
    if not isinstance(split, TokenizedSplit):
        return split.collate(rows, pad_id)
    seqs = [split.input_ids[i] for i in rows]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = s
        mask[j, : len(s)] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(split.labels[rows]),
    }


def shuffled_batches(split, rows: np.ndarray, batch_size: int, rng: np.random.Generator, pad_id: int,
                     collate_fn: Callable[..., dict] = collate) -> Iterator[dict]:  # noqa: ANN001
    """``rows`` in a random order, ``batch_size`` at a time, each batch made by ``collate_fn``
    (padded by default; :func:`fedpeft.model.packing.collate_packed` packs the same rows)."""
    order = rng.permutation(rows)
    for start in range(0, len(order), batch_size):
        yield collate_fn(split, order[start : start + batch_size], pad_id)


def eval_batches(split, batch_size: int, pad_id: int,
                 shard: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
    """Length-sorted batches: evaluation order does not matter, padding does.

    ``shard = (i, k)`` yields every k-th batch starting at batch i: the k shards together are
    exactly the unsharded batches (same rows, same padding), with similar work each."""
    index, count = shard
    order = np.argsort(split.lengths, kind="stable")
    for start in list(range(0, len(order), batch_size))[index::count]:
        yield collate(split, order[start : start + batch_size], pad_id)
