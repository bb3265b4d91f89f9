"""Training precision (``--precision``): opt-in bfloat16 autocast for local training.

``bf16`` runs the client's forward (and so its backward) matmuls in bfloat16 through
``torch.autocast("cpu")``; the adapter's parameters, the optimizer state, the update a client
uploads and the server's evaluation stay float32. On a CPU with AVX512-BF16 a client step is
~1.5x cheaper (benchmarks/bench_bottom_cache.py), at an accuracy cost measured in the README.
It changes the numbers, so it is never the default and side-by-side peer benchmarks stay fp32.

Under ``--dp sample`` it is refused (:class:`fedpeft.stages.dp_sgd.DpSgd`): Opacus would
compute per-example gradients and their norms in bfloat16, so the clip bound would hold only to
bfloat16's ~3 significant digits. User-level DP is unaffected: the server clips the float32
update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager

import torch

from fedpeft.registry import Registry

PRECISIONS: Registry[Callable[[], ContextManager[None]]] = Registry("precision")
PRECISIONS.register("fp32")(contextlib.nullcontext)
PRECISIONS.register("bf16")(lambda: torch.autocast("cpu", dtype=torch.bfloat16))


def forward_precision(name: str) -> Callable[[], ContextManager[None]]:
    """A factory of the context each training forward runs in for ``--precision name``: one
    context per forward, never one around the optimizer step (autocast's weight cache lives
    until its context exits, :func:`fedpeft.training.local.train_local`)."""
    return PRECISIONS.get(name)


__all__ = ["PRECISIONS", "forward_precision"]
