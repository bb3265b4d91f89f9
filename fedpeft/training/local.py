"""One client's local fine-tuning of the trainable (adapter + head) parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LocalResult:
    mean_loss: float
    steps: int
    examples: int


#: ``before_step(step)`` may return a callable run right after that step's ``opt.step()``.
StepHook = Callable[[int], Callable[[], None] | None]


def train_local(model: nn.Module, epochs_batches: Iterable[Iterable[dict[str, torch.Tensor]]],
                lr: float, before_step: StepHook | None = None,
                forward_context: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext) -> LocalResult:
    """AdamW over the parameters that require grad; a fresh optimizer each round (FL norm).

    ``epochs_batches`` yields one iterable of batches per local epoch. ``before_step`` lets an
    adapter act before each step (DyLoRA samples its rank there) and, through the callable it
    returns, right after it (DyLoRA undoes optimizer moves outside the step's rank).
    ``forward_context`` wraps each forward alone (``--precision bf16``'s autocast): autocast
    caches its low-precision copies of the weights until its context exits, so a context held
    across ``opt.step()`` would keep running every later forward on the first step's weights.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    total, steps, examples = 0.0, 0, 0
    for batches in epochs_batches:
        for batch in batches:
            after_step = before_step(steps) if before_step is not None else None
            with forward_context():
                out = model(**batch)
            out.loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            opt.zero_grad(set_to_none=True)
            n = int(batch["labels"].shape[0])
            total += float(out.loss.detach()) * n
            examples += n
            steps += 1
    model.eval()
    return LocalResult(mean_loss=total / max(examples, 1), steps=steps, examples=examples)
