"""The frozen part computed once: the features the classification head reads.

When nothing below the head is trained (``--adapter head``), every forward pass through the
frozen encoder gives the same vector for the same example. Computing it once per example —
instead of once per example per round per client visit — is what makes the large cohorts DP
needs affordable (SPEC §3.5). The features are the exact input of the model's ``classifier``
module in eval mode (captured with a forward hook, so any pooling the checkpoint uses is
respected), cached on disk under ``$FEDPEFT_CACHE_DIR`` (default ``~/.cache/fedpeft``) keyed by
everything that determines them, and shared by the server and all workers through a file lock:
the first process computes, the others load.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpeft.data.tokenized import TokenizedSplit, eval_batches
from fedpeft.disk_cache import cache_root, cached_arrays, key_of

#: bump when the way features are computed changes (invalidates old cache files)
FEATURE_VERSION = 1


@dataclass
class FeatureSplit:
    """A split as the head sees it: one frozen feature vector per example."""

    features: np.ndarray  # (n, hidden) float32
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.ones(len(self.labels), dtype=np.int64)

    def collate(self, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        return {"features": torch.from_numpy(self.features[rows]),
                "labels": torch.from_numpy(self.labels[rows])}


def cache_dir() -> Path:
    return cache_root() / "features"


def cache_key(parts: dict[str, object]) -> str:
    """Hash of everything that determines the features (local paths add size and mtime)."""
    described = dict(parts)
    for name in ("model_path", "dataset"):
        p = Path(str(parts.get(name, "")))
        if p.exists():
            stat = p.stat()
            described[f"{name}_stat"] = [stat.st_size, int(stat.st_mtime)]
    described["version"] = FEATURE_VERSION
    return key_of(described, 24)


@torch.inference_mode()
def head_inputs(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> np.ndarray:
    """What ``model.classifier`` receives for each batch, in eval mode, stacked (float32).

    Raises ValueError when the head reads more than one vector per example (e.g. a RoBERTa
    head over all token states): then there is no per-example feature to cache.
    """
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        raise ValueError("the model has no 'classifier' module whose input could be cached")
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        x = args[0]
        if x.dim() != 2:
            raise ValueError(f"the classifier reads a {x.dim()}-d input {tuple(x.shape)}, not one vector "
                             "per example; --adapter head needs a pooled-feature head")
        captured.append(x.detach().to(torch.float32).clone())

    was_training = model.training
    model.eval()
    handle = head.register_forward_hook(grab)
    try:
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured).numpy() if captured else np.zeros((0, 0), dtype=np.float32)


def split_features(model: nn.Module, split: TokenizedSplit, pad_id: int, batch_size: int = 64) -> np.ndarray:
    """:func:`head_inputs` of every row of ``split``, in row order (computed in length-sorted
    batches, which pad least)."""
    order = np.argsort(split.lengths, kind="stable")  # the order eval_batches yields rows in
    feats = head_inputs(model, eval_batches(split, batch_size, pad_id))
    out = np.empty_like(feats)
    out[order] = feats
    return out


def cached_features(key: str, compute: callable) -> dict[str, np.ndarray]:  # type: ignore[valid-type]
    """``compute()`` (a dict of arrays) once per key on this machine; later calls load it
    (:func:`fedpeft.disk_cache.cached_arrays`: locked against concurrent builders, atomic)."""
    return cached_arrays("features", key, compute)


__all__ = ["FEATURE_VERSION", "FeatureSplit", "cache_dir", "cache_key", "cached_features", "head_inputs",
           "split_features"]
