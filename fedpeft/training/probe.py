"""Linear probing, then fine-tuning (LP-FT; Kumar et al. 2022, "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution"), as a round schedule: ``--probe-rounds K``.

In rounds 1..K the clients train only the classification head (at ``--probe-lr``); the adapter
joins from round K+1, starting from a head that already separates the classes instead of a
random one. Under user-level DP this matters twice: a random head makes the adapter's early
gradients uninformative while every round still pays its noise, and in a probe round the server
releases only the head's coordinates (d = hidden·labels + labels instead of the adapter's
thousands), so the noise ``z·S·√d/(qN)`` of those rounds is that of the linear probe. The
accounting is unchanged: every round is the same sampled Gaussian mechanism (same q, z, S);
only the set of released coordinates differs, and the coordinates not released in a round are
data-independent (the server does not use the clients' values for them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

#: the classification head's parameters are the ones under the model's ``classifier`` module
#: (plain, or peft's ``modules_to_save`` copy of it)
HEAD_MODULE = "classifier"

V = TypeVar("V")


def is_head(name: str) -> bool:
    return HEAD_MODULE in name.split(".")


def probing(server_round: int, probe_rounds: int) -> bool:
    """True in the rounds that train the head alone (rounds are numbered from 1)."""
    return 1 <= server_round <= probe_rounds


def head_only(state: Mapping[str, V]) -> dict[str, V]:
    """The head's entries of a state or layout (what a probe round releases)."""
    return {k: v for k, v in state.items() if is_head(k)}


@contextmanager
def train_head_only(model: nn.Module) -> Iterator[None]:
    """Within the block only the head's trainable parameters require grad; restored after, so
    the adapter's upload (every trainable tensor) is unchanged in layout."""
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and not is_head(n)]
    if len(frozen) == sum(1 for p in model.parameters() if p.requires_grad):
        raise ValueError(f"--probe-rounds: the model has no trainable '{HEAD_MODULE}' head")
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
