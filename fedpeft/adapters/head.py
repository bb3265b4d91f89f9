"""Head-only training: the smallest trainable set (hidden·labels + labels coordinates).

Under user-level DP the noise on the mean update has norm z·S·√d/(qN) (SPEC §3.5); with
d = 770 instead of LoRA r8's 74,498 it is ~10x smaller at the same ε and cohort. Nothing below
the head is trained, so the encoder's output is computed once per example and cached
(:mod:`fedpeft.data.features`): clients and the server's evaluation run the head alone.
"""

from __future__ import annotations

from torch import nn

from fedpeft.adapters.base import Adapter
from fedpeft.adapters.registry import ADAPTERS


@ADAPTERS.register("head")
class HeadOnly(Adapter):
    name = "head"
    #: the workspace replaces the encoder by cached features (nothing below the head trains)
    frozen_encoder = True

    def inject(self, model: nn.Module) -> nn.Module:
        head = getattr(model, "classifier", None)
        if not isinstance(head, nn.Module):
            raise ValueError("--adapter head needs a model with a 'classifier' module")
        model.requires_grad_(False)
        head.requires_grad_(True)
        return model

    def rank_in_force(self, round_rank: int | None) -> int | None:  # type: ignore[override]
        return None  # no LoRA rank
