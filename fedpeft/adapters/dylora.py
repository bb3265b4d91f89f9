"""DyLoRA and DP-DyLoRA (Xu et al. 2024, arXiv 2405.06368; SPEC §1.3).

The adapter is allocated at ``r_max = spec.rank``. Training at rank ``b`` uses exactly
``ΔW x = (alpha / b) · B[:, :b] A[:b] x``: a forward pre-hook zeroes the components of
``lora_B``'s input beyond ``b`` (so ``B``'s columns beyond ``b`` see zero input and ``A``'s
rows beyond ``b`` get zero gradient), and the peft layer's ``scaling`` is set to ``alpha / b``
for the step. The mask sits on ``B``'s input, not on ``A``'s output: Opacus computes
``lora_A``'s per-example gradients from the gradient at ``lora_A``'s own output, which a hook
after ``lora_A`` would leave non-zero beyond ``b`` — inflating the per-example norms that
DP-SGD clips. With the mask before ``B``, every per-example gradient beyond ``b`` is exactly 0.
Loading a state (every client's round start, the server's evaluation) restores rank ``r_max``
and ``alpha / r_max``, so evaluation always uses the full adapter.

- ``dylora``: every local step samples ``b`` uniformly in ``{min_rank..r_max}`` and trains the
  first ``b`` components (the paper's default mode); the whole adapter is uploaded.
- ``dp-dylora``: the server draws one ``b_t`` per round (data-independent, so it costs no
  privacy) and sends it in the round's config; clients receive, train and upload only
  ``A[:b_t]``, ``B[:, :b_t]`` and the head, so upload bytes shrink with ``b_t``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from fedpeft.adapters.base import Adapter, State, StepHook, truncate_state
from fedpeft.adapters.lora import inject_lora
from fedpeft.adapters.registry import ADAPTERS

_RANK_ATTR = "_fedpeft_dylora_rank"  # set on each lora_B module; None = full rank


# -- pure rank math ------------------------------------------------------------------------
def rank_scale(alpha: float, rank: int) -> float:
    """DyLoRA's scale at rank ``b``: ``alpha / b`` (SPEC §1.3)."""
    return alpha / rank


# -- rank control on a peft model ---------------------------------------------------------
def _mask_beyond_rank(module: nn.Module, inputs: tuple) -> tuple | None:
    """Forward pre-hook on ``lora_B``: keep the first ``b`` input components, zero the rest."""
    b = getattr(module, _RANK_ATTR, None)
    x = inputs[0]
    if b is None or b >= x.shape[-1]:
        return None
    keep = torch.arange(x.shape[-1], device=x.device) < b
    return (x * keep.to(x.dtype), *inputs[1:])


def lora_layers(model: nn.Module) -> list[tuple[LoraLayer, str]]:
    """``(layer, adapter name)`` for every peft LoRA layer of ``model``."""
    return [(m, name) for m in model.modules() if isinstance(m, LoraLayer) for name in m.lora_A]


def install_rank_hooks(model: nn.Module) -> None:
    for layer, name in lora_layers(model):
        b = layer.lora_B[name]
        setattr(b, _RANK_ATTR, None)
        b.register_forward_pre_hook(_mask_beyond_rank)


def set_rank(model: nn.Module, rank: int | None) -> None:
    """Run every LoRA layer at rank ``rank`` with scale ``alpha / rank``; None = full ``r_max``."""
    for layer, name in lora_layers(model):
        r_max = layer.r[name]
        b = r_max if rank is None else min(rank, r_max)
        setattr(layer.lora_B[name], _RANK_ATTR, None if b == r_max else b)
        layer.scaling[name] = rank_scale(layer.lora_alpha[name], b)


def train_at_ranks(model: nn.Module, draw: Callable[[int], int]) -> StepHook:
    """Step hook: step ``k`` trains at rank ``draw(k)`` and changes only components ``< b``.

    Gradients beyond ``b`` are exactly zero, but AdamW's momentum from earlier, larger-rank
    steps would still move those components; the returned ``after`` puts them back, so a step
    at rank ``b`` changes exactly the first ``b`` components ("trains the first b").
    """
    layers = lora_layers(model)

    def before(step: int) -> Callable[[], None]:
        b = int(draw(step))
        set_rank(model, b)
        with torch.no_grad():
            tails = [(layer.lora_A[n].weight, layer.lora_B[n].weight) for layer, n in layers]
            saved = [(a[b:].clone(), bw[:, b:].clone()) for a, bw in tails]

        def after() -> None:
            with torch.no_grad():
                for (a, bw), (a_tail, b_tail) in zip(tails, saved):
                    a[b:].copy_(a_tail)
                    bw[:, b:].copy_(b_tail)

        return after

    return before


@ADAPTERS.register("dylora")
class DyLoRA(Adapter):
    """DyLoRA: a fresh rank ``b ~ U{min_rank..r_max}`` for every local step."""

    name = "dylora"
    fixed_scale = False  # alpha / b with b drawn per step (or per round for DP-DyLoRA)

    def inject(self, model: nn.Module) -> nn.Module:
        s = self.spec
        peft_model = inject_lora(model, s.rank, s.alpha, s.target_modules, s.seed, s.layers, s.task_type)
        install_rank_hooks(peft_model)
        return peft_model

    def load_state(self, model: nn.Module, state: State) -> None:
        set_rank(model, None)  # undo whatever rank the last client trained at
        super().load_state(model, state)

    def step_hook(self, model: nn.Module, rng: np.random.Generator,
                  round_rank: int | None) -> StepHook | None:
        lo, hi = self.spec.min_rank, self.spec.rank
        return train_at_ranks(model, lambda _step: int(rng.integers(lo, hi + 1)))

    def upload(self, model: nn.Module, round_rank: int | None) -> State:
        set_rank(model, None)  # training is over: leave the model at r_max
        return self.trainable_state(model)


@ADAPTERS.register("dp-dylora")
class DPDyLoRA(DyLoRA):
    """DP-DyLoRA: one server-drawn rank ``b_t`` per round; only its prefix moves either way."""

    name = "dp-dylora"

    def round_rank(self, rng: np.random.Generator) -> int | None:
        return int(rng.integers(self.spec.min_rank, self.spec.rank + 1))

    def broadcast(self, global_state: State, round_rank: int | None) -> State:
        return global_state if round_rank is None else truncate_state(global_state, round_rank)

    def step_hook(self, model: nn.Module, rng: np.random.Generator,
                  round_rank: int | None) -> StepHook | None:
        b = self.spec.rank if round_rank is None else round_rank
        return train_at_ranks(model, lambda _step: b)

    def upload(self, model: nn.Module, round_rank: int | None) -> State:
        full = super().upload(model, round_rank)
        return full if round_rank is None else truncate_state(full, round_rank)
