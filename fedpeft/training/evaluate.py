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
    #: what ``loss`` and ``accuracy`` are means over when it is not the examples: the scored
    #: tokens of a causal LM (its answer tokens); 0 = per example
    tokens: int = 0

    @property
    def units(self) -> int:
        return self.tokens or self.examples

    @staticmethod
    def combine(parts: Iterable[EvalResult]) -> EvalResult:
        """The result over the union of disjoint evaluations (weighted by examples, or by
        scored tokens when the parts count them)."""
        parts = list(parts)
        n = sum(p.examples for p in parts)
        tokens = sum(p.tokens for p in parts)
        units = tokens or n
        return EvalResult(loss=sum(p.loss * p.units for p in parts) / max(units, 1),
                          accuracy=sum(round(p.accuracy * p.units) for p in parts) / max(units, 1), examples=n,
                          tokens=tokens)


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


@torch.inference_mode()
def evaluate_tokens(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> EvalResult:
    """A causal LM scored on its labelled tokens: ``labels[t]`` (-100 = not scored) is predicted
    from the positions before ``t``. ``loss`` is the mean cross-entropy per scored token (its
    exp is the perplexity), ``accuracy`` the share of scored tokens that are the argmax."""
    model.eval()
    loss_sum, correct, tokens, n = 0.0, 0, 0, 0
    for batch in batches:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        target = labels[:, 1:]
        scored = target != -100
        picked = logits[:, :-1][scored].float()
        loss_sum += float(torch.nn.functional.cross_entropy(picked, target[scored], reduction="sum"))
        correct += int((picked.argmax(-1) == target[scored]).sum())
        tokens += int(scored.sum())
        n += int(labels.shape[0])
    return EvalResult(loss=loss_sum / max(tokens, 1), accuracy=correct / max(tokens, 1), examples=n, tokens=tokens)
