"""The adapter interface: what is trained, what is sent, how the server rebuilds the global.

One adapter = one module with a config dataclass, registered by name (``--adapter``).
Parameters are addressed by their peft names (``...query.lora_A.default.weight``); the
"state" that moves between server and clients is a ``dict[str, Tensor]`` of trainable
tensors only — the frozen backbone never leaves a process.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedpeft.updates import prefix_slice

State = dict[str, torch.Tensor]
#: ``hook(step)`` runs before a local optimizer step and may return an ``after()`` callable.
StepHook = Callable[[int], Callable[[], None] | None]

_LORA_A = re.compile(r"^(?P<layer>.+)\.lora_A\.(?P<name>[^.]+)\.weight$")
_LORA_B = re.compile(r"^(?P<layer>.+)\.lora_B\.(?P<name>[^.]+)\.weight$")


_BASE_WEIGHT = ".base_layer.weight"


def lora_factor(key: str) -> str | None:
    """``"A"`` or ``"B"`` for a peft LoRA factor (``<layer>.lora_A.<adapter>.weight``), else
    None: the one place where peft parameter names are parsed."""
    if _LORA_A.match(key):
        return "A"
    if _LORA_B.match(key):
        return "B"
    return None


def base_weight_key(factor_key: str) -> str:
    """``<layer>.lora_A.<name>.weight`` -> ``<layer>.base_layer.weight``, the frozen weight
    the factor adapts (FLoRA folds into it; export writes it)."""
    match = _LORA_A.match(factor_key) or _LORA_B.match(factor_key)
    if match is None:
        raise ValueError(f"{factor_key!r} is not a peft LoRA factor name")
    return match.group("layer") + _BASE_WEIGHT


def truncate_shape(key: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The shape :func:`truncate_factor` leaves of a tensor of ``shape``."""
    factor = lora_factor(key)
    if factor == "A":
        return (min(rank, shape[0]), *shape[1:])
    if factor == "B":
        return (shape[0], min(rank, shape[1]), *shape[2:])
    return tuple(shape)


def truncate_factor(key: str, value: torch.Tensor, rank: int) -> torch.Tensor:
    """The first ``rank`` components of a LoRA factor: ``A[:rank]`` or ``B[:, :rank]``."""
    factor = lora_factor(key)
    if factor == "A":
        return value[:rank]
    if factor == "B":
        return value[:, :rank]
    return value


def truncate_state(state: State, rank: int) -> State:
    """Every LoRA factor cut to its first ``rank`` components; other tensors unchanged (what
    a rank-``rank`` client uploads: DP-DyLoRA's round rank, FLoRA's ``--client-ranks``)."""
    return {k: truncate_factor(k, v, rank).clone() for k, v in state.items()}


@dataclass(frozen=True)
class AdapterSpec:
    """Options shared by the LoRA family (SPEC §1)."""

    rank: int = 8
    alpha: float = 16.0
    min_rank: int = 1
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 0
    #: encoder layer indices to adapt (() = every layer), e.g. the top k
    layers: tuple[int, ...] = ()
    #: peft task type of the run's task (``Task.peft_task_type``): SEQ_CLS trains the head
    #: beside the adapter (``modules_to_save``), CAUSAL_LM only the adapter
    task_type: str = "SEQ_CLS"


class Adapter(ABC):
    """Strategy-agnostic description of one parameter-efficient adapter."""

    name: ClassVar[str]
    #: False when the LoRA scale depends on a rank chosen per step or round (DyLoRA's
    #: ``alpha / b``): then ``scale · B A`` is not one fixed product per client.
    fixed_scale: ClassVar[bool] = True
    #: True when nothing below the classification head is trained, so the encoder's output can
    #: be computed once per example and cached (fedpeft.data.features)
    frozen_encoder: ClassVar[bool] = False
    #: the settings a client reads for this adapter: what its :class:`AdapterSpec` is built from
    #: (``fedpeft.engine.workspace.adapter_spec``; a client is sent only declared settings)
    client_settings: ClassVar[tuple[str, ...]] = ("rank", "alpha", "min_rank", "target_modules", "lora_layers", "seed")

    def __init__(self, spec: AdapterSpec) -> None:
        self.spec = spec

    @abstractmethod
    def inject(self, model: nn.Module) -> nn.Module:
        """Wrap the frozen backbone; afterwards only adapter and head require grad."""

    # -- state handling -------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> State:
        """Detached copies of every trainable tensor (the global state's layout)."""
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_state(self, model: nn.Module, state: State) -> None:
        """Copy (a subset of) a state into the model's parameters in place."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                target = params[key]
                if value.shape == target.shape:
                    target.copy_(value)
                else:  # a rank prefix (DyLoRA): copy into the leading block
                    target[prefix_slice(value.shape)].copy_(value)

    def broadcast(self, global_state: State, round_rank: int | None) -> State:
        """What the server sends to a sampled client (default: the whole trainable state)."""
        return global_state

    def upload(self, model: nn.Module, round_rank: int | None) -> State:
        """What a client sends back after training (default: every trainable tensor)."""
        return self.trainable_state(model)

    def merge(self, global_state: State, aggregate: State, round_rank: int | None) -> State:
        """New global state from the aggregated upload (default: replace uploaded keys)."""
        new = dict(global_state)
        for key, value in aggregate.items():
            if value.shape == new[key].shape:
                new[key] = value.clone()
            else:
                t = new[key].clone()
                t[prefix_slice(value.shape)] = value
                new[key] = t
        return new

    def client_view(self, global_state: State, upload: State) -> State:
        """One client's full trainable state: the global with its upload written in."""
        return self.merge(global_state, upload, None)

    def step_hook(self, model: nn.Module, rng: np.random.Generator,
                  round_rank: int | None) -> StepHook | None:
        """Called before every local optimizer step with the step index (DyLoRA samples its
        rank here); may return a callable that runs right after that step's ``opt.step()``."""
        return None

    def round_rank(self, rng: np.random.Generator) -> int | None:
        """Rank the server imposes this round (DP-DyLoRA), or None."""
        return None

    def rank_in_force(self, round_rank: int | None) -> int:
        return self.spec.rank if round_rank is None else round_rank

    # -- LoRA structure -------------------------------------------------------------
    @property
    def lora_scale(self) -> float:
        """peft's ``scaling`` of every adapted layer, ``alpha / r`` (the product a layer adds
        to its frozen weight is ``lora_scale · B A``)."""
        return self.spec.alpha / self.spec.rank

    def with_frozen_factors(self, state: State) -> State:
        """``state`` plus every LoRA factor that is frozen and shared by all parties.

        Trainable states omit frozen tensors, but the product ``B A`` (e.g. for the
        aggregation error, SPEC §1.1) needs both factors; FFA-LoRA adds its seeded ``A``.
        """
        return state

    @staticmethod
    def limit_rank(model: nn.Module, rank: int) -> Callable[[], None]:
        """Make the model's trainable LoRA factors rank ``rank``: zero the components beyond
        it (trainable A rows, B columns) and return the callable that zeroes them again
        (run after every optimizer step, so noise or weight decay cannot revive them).

        With ``A[rank:] = 0`` and ``B[:, rank:] = 0`` the gradients of those entries are
        exactly 0 too, so the truncated client is a true rank-``rank`` LoRA (frozen A, as in
        FFA-LoRA, keeps its rows; zero B columns switch them off)."""
        targets = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if _LORA_A.match(name):
                targets.append(param[rank:])
            elif _LORA_B.match(name):
                targets.append(param[:, rank:])

        def zero() -> None:
            with torch.no_grad():
                for view in targets:
                    view.zero_()

        zero()
        return zero

    @staticmethod
    def lora_pairs(keys: list[str] | set[str]) -> list[tuple[str, str]]:
        """``(A key, B key)`` for every adapted layer present in ``keys``."""
        keyset = set(keys)
        pairs = []
        for key in sorted(keyset):
            m = _LORA_A.match(key)
            if m:
                b = f"{m['layer']}.lora_B.{m['name']}.weight"
                if b in keyset:
                    pairs.append((key, b))
        return pairs
