"""Central evaluation of the global model on the held-out test split."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    examples: int

    @staticmethod
    def combine(parts: Iterable[EvalResult]) -> EvalResult:
        """The result over the union of disjoint evaluations (example-weighted)."""
        parts = list(parts)
        n = sum(p.examples for p in parts)
        return EvalResult(loss=sum(p.loss * p.examples for p in parts) / max(n, 1),
                          accuracy=sum(round(p.accuracy * p.examples) for p in parts) / max(n, 1), examples=n)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> EvalResult:
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for batch in batches:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        n += int(labels.shape[0])
    return EvalResult(loss=loss_sum / max(n, 1), accuracy=correct / max(n, 1), examples=n)
