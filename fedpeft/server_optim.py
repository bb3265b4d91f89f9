"""Server optimisers (SPEC §3.6; Reddi et al. 2021, "Adaptive Federated Optimization").

The strategy's aggregation yields a new global state (FedAvg of the clients, or the global
plus the noised DP mean update). A server optimiser treats ``Δₜ = aggregate − xₜ`` as a
pseudo-gradient ``−gₜ`` and takes one optimiser step from ``xₜ``. It only reads the
released aggregate and its own past outputs, so under DP it is post-processing and
changes no ε (SPEC §3.6).

Pure tensor code, no Flower: a strategy calls ``opt.step(global_state, aggregate)`` and
checkpoints ``opt.state_dict()`` (JSON scalars + named tensors for safetensors).
Implementations are chosen by name through :data:`SERVER_OPTIMIZERS` /
:func:`build_server_optimizer`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from fedpeft.adapters.base import State
from fedpeft.errors import UsageError
from fedpeft.registry import Registry

__all__ = [
    "SERVER_OPTIMIZERS",
    "FedAdam",
    "FedAvgM",
    "FedYogi",
    "NoServerOptimizer",
    "ServerOptimizer",
    "State",
    "build_server_optimizer",
]


class ServerOptimizer(ABC):
    """One optimiser step per round on the pseudo-gradient ``Δₜ = aggregate − xₜ``.

    Per key of ``aggregate`` (the aggregate defines the next global's keys; keys only in
    ``global_state`` are dropped):

    - a key missing from ``global_state`` has no ``xₜ`` to step from, and a key whose shape
      differs between the two (DP-DyLoRA / FLoRA rank changes) has no meaningful ``Δₜ``;
      both are passed through unchanged from ``aggregate`` and their moment buffers are
      reset, so they restart from zero once the shapes agree again;
    - every other key is stepped in float64 and returned in the dtype (and on the device)
      of ``global_state``'s tensor.

    Moment buffers live per key in named slots (``"m"``, ``"v"``); they are float64 so a
    checkpoint/resume continues bit-identically.
    """

    name: ClassVar[str]
    #: Names of the per-key moment buffers this optimiser keeps (checkpointed as
    #: ``"<slot>/<param>"``).
    slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, lr: float = 1.0) -> None:
        self.lr = _check_lr(lr)
        self.steps = 0
        self._buffers: dict[str, dict[str, torch.Tensor]] = {s: {} for s in self.slots}

    @classmethod
    def from_options(cls, *, lr: float, momentum: float, beta2: float, tau: float) -> ServerOptimizer:
        """Build from the shared CLI options; each optimiser takes the ones it uses."""
        return cls(lr=lr)

    # -- the step -----------------------------------------------------------------------
    def step(self, global_state: State, aggregate: State) -> State:
        """``xₜ₊₁`` from ``xₜ = global_state`` and the strategy's ``aggregate``."""
        out: State = {}
        stepped: set[str] = set()
        for key, agg in aggregate.items():
            glob = global_state.get(key)
            if glob is None or glob.shape != agg.shape:
                out[key] = agg
                continue
            x = glob.detach().to(torch.float64)
            delta = agg.detach().to(device=x.device, dtype=torch.float64) - x
            out[key] = self._step_key(key, x, delta, agg).to(glob.dtype)
            stepped.add(key)
        for buffers in self._buffers.values():
            for key in [k for k in buffers if k not in stepped]:
                del buffers[key]
        self.steps += 1
        return out

    @abstractmethod
    def _step_key(self, key: str, x: torch.Tensor, delta: torch.Tensor,
                  aggregate: torch.Tensor) -> torch.Tensor:
        """``xₜ₊₁`` for one key (float64 ``x`` and ``delta``); updates this key's buffers."""

    def _buffer(self, slot: str, key: str, like: torch.Tensor) -> torch.Tensor:
        """The slot's previous value for ``key``; zero (``m₀ = v₀ = 0``) if none or stale."""
        prev = self._buffers[slot].get(key)
        if prev is None or prev.shape != like.shape:
            return torch.zeros_like(like)
        return prev.to(like.device)

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(meta, tensors)``: JSON-serialisable scalars and ``"<slot>/<param>"`` tensors."""
        meta = {"optimizer": self.name, "steps": self.steps, "hparams": self._hparams()}
        tensors = {f"{slot}/{key}": t.detach().cpu().contiguous()
                   for slot, buffers in self._buffers.items() for key, t in buffers.items()}
        return meta, tensors

    def load_state_dict(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved, so a resumed run continues identically.

        ``meta["hparams"]`` is informational: the hyperparameters come from the config.
        """
        if meta.get("optimizer") != self.name:
            raise ValueError(f"state of server optimizer {meta.get('optimizer')!r} cannot be "
                             f"loaded into a {self.name!r} server optimizer")
        buffers: dict[str, dict[str, torch.Tensor]] = {s: {} for s in self.slots}
        for name, t in tensors.items():
            slot, sep, key = name.partition("/")
            if not sep or slot not in buffers:
                raise ValueError(f"unexpected tensor {name!r} in {self.name!r} server optimizer "
                                 f"state; expected '<slot>/<param>' with slot in {list(self.slots)}")
            buffers[slot][key] = t.detach().to(torch.float64).clone()
        self._buffers = buffers
        self.steps = int(meta["steps"])

    def _hparams(self) -> dict[str, float]:
        return {"lr": self.lr}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self._hparams().items())
        return f"{type(self).__name__}({args}, steps={self.steps})"


SERVER_OPTIMIZERS: Registry[type[ServerOptimizer]] = Registry("server optimizer")


@SERVER_OPTIMIZERS.register("none")
class NoServerOptimizer(ServerOptimizer):
    """``xₜ₊₁ = xₜ + η·Δₜ``: server SGD; with ``η = 1`` exactly the aggregate (plain FedAvg).

    ``η = 1`` returns the aggregate's values bit-identically (cast to the global's dtype)
    rather than ``x + (a − x)``, which float64 rounding could move by an ulp — so adding
    this stage never changes results of runs without a server optimiser.
    """

    name = "none"

    def _step_key(self, key: str, x: torch.Tensor, delta: torch.Tensor,
                  aggregate: torch.Tensor) -> torch.Tensor:
        if self.lr == 1.0:
            return aggregate.detach().to(x.device).clone()
        return x + self.lr * delta


@SERVER_OPTIMIZERS.register("fedavgm")
class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019; Reddi et al. 2021 §3): ``mₜ = β·mₜ₋₁ + Δₜ``,
    ``xₜ₊₁ = xₜ + η·mₜ``, ``m₀ = 0`` (SPEC §3.6). Same recursion as Flower's FedAvgM."""

    name = "fedavgm"
    slots = ("m",)

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr=lr)
        self.momentum = _check_unit_interval("server momentum", momentum)

    @classmethod
    def from_options(cls, *, lr: float, momentum: float, beta2: float, tau: float) -> ServerOptimizer:
        return cls(lr=lr, momentum=momentum)

    def _step_key(self, key: str, x: torch.Tensor, delta: torch.Tensor,
                  aggregate: torch.Tensor) -> torch.Tensor:
        m = self.momentum * self._buffer("m", key, delta) + delta
        self._buffers["m"][key] = m
        return x + self.lr * m

    def _hparams(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}


@SERVER_OPTIMIZERS.register("fedadam")
class FedAdam(ServerOptimizer):
    """FedAdam (Reddi et al. 2021, Algorithm 2; SPEC §3.6):
    ``mₜ = β₁mₜ₋₁ + (1−β₁)Δₜ``, ``vₜ = β₂vₜ₋₁ + (1−β₂)Δₜ²``, ``xₜ₊₁ = xₜ + η·mₜ/(√vₜ + τ)``,
    with ``m₀ = v₀ = 0``.

    No bias correction, as in Reddi et al.'s Algorithm 2 and the SPEC formula. Flower's
    FedAdam does rescale η by ``√(1−β₂ᵗ⁺¹)/(1−β₁ᵗ⁺¹)`` (``t`` = its 1-based round, so its
    exponent is one ahead of Kingma & Ba's); its FedYogi does not. We keep Adam and Yogi
    consistent with the paper. The adaptivity ``τ`` in the denominator already bounds the
    early steps that bias correction is meant to fix, and with ``v₀ = 0`` the first step is
    ``η·0.1Δ/(0.1|Δ| + τ) ≈ η·sign(Δ)`` for the default betas.
    """

    name = "fedadam"
    slots = ("m", "v")

    def __init__(self, *, lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(lr=lr)
        self.beta1 = _check_unit_interval("server momentum (beta1)", beta1)
        self.beta2 = _check_unit_interval("server beta2", beta2)
        self.tau = _check_tau(tau)

    @classmethod
    def from_options(cls, *, lr: float, momentum: float, beta2: float, tau: float) -> ServerOptimizer:
        return cls(lr=lr, beta1=momentum, beta2=beta2, tau=tau)

    def _second_moment(self, v_prev: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v_prev + (1.0 - self.beta2) * delta_sq

    def _step_key(self, key: str, x: torch.Tensor, delta: torch.Tensor,
                  aggregate: torch.Tensor) -> torch.Tensor:
        m = self.beta1 * self._buffer("m", key, delta) + (1.0 - self.beta1) * delta
        v = self._second_moment(self._buffer("v", key, delta), delta * delta)
        self._buffers["m"][key] = m
        self._buffers["v"][key] = v
        return x + self.lr * m / (torch.sqrt(v) + self.tau)

    def _hparams(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}


@SERVER_OPTIMIZERS.register("fedyogi")
class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021, Algorithm 2; SPEC §3.6): FedAdam with
    ``vₜ = vₜ₋₁ − (1−β₂)Δₜ²·sign(vₜ₋₁ − Δₜ²)``, which moves ``v`` towards ``Δₜ²`` by an
    additive rather than multiplicative amount, so ``v`` (and the effective step) cannot
    collapse after a few large noisy rounds. ``sign(0) = 0``; ``v`` stays ≥ 0."""

    name = "fedyogi"

    def _second_moment(self, v_prev: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v_prev - (1.0 - self.beta2) * delta_sq * torch.sign(v_prev - delta_sq)


def build_server_optimizer(name: str, lr: float = 1.0, momentum: float = 0.9,
                           beta2: float = 0.99, tau: float = 1e-3) -> ServerOptimizer:
    """The server optimiser ``name`` (see :data:`SERVER_OPTIMIZERS`).

    ``momentum`` is FedAvgM's β and FedAdam/FedYogi's β₁. Every option is validated even
    when ``name`` ignores it, so a bad config value never goes unnoticed. Raises
    :class:`~fedpeft.errors.UsageError` (a ``ValueError``) naming the bad value.
    """
    if name not in SERVER_OPTIMIZERS:
        raise UsageError(f"--server-opt {name!r} is invalid; allowed: {', '.join(SERVER_OPTIMIZERS.names())}")
    cls = SERVER_OPTIMIZERS.get(name)
    _check_lr(lr)
    _check_unit_interval("--server-momentum", momentum)
    _check_unit_interval("--server-beta2", beta2)
    _check_tau(tau)
    return cls.from_options(lr=lr, momentum=momentum, beta2=beta2, tau=tau)


def _check_lr(lr: float) -> float:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"--server-lr {lr!r} is invalid; allowed: a finite number > 0")
    return float(lr)


def _check_unit_interval(what: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise UsageError(f"{what} {value!r} is invalid; allowed: a number in [0, 1)")
    return float(value)


def _check_tau(tau: float) -> float:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise UsageError(f"--server-tau {tau!r} is invalid; allowed: a finite number > 0")
    return float(tau)
