"""Privacy accountants (SPEC §3.1 "Accounting", §3.2): a small interface over Opacus.

fedpeft never does its own privacy arithmetic: :class:`RdpAccountant` and
:class:`PrvAccountant` keep the event history in Opacus' own format
(``[(noise_multiplier, sample_rate, num_steps), ...]``) and ask
``opacus.accountants.RDPAccountant`` / ``PRVAccountant`` for ε. Every event is one
Poisson-sampled Gaussian mechanism: a round of user-level DP-FedAvg (§3.1) or a DP-SGD
step on a client (§3.2).

The state is a JSON-serializable dict, so a checkpoint can carry a client's accountant
across the rounds it trains in (§3.2: never reset ε by starting a fresh accountant).
"""

from __future__ import annotations

import math
from abc import ABC
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

from fedpeft.registry import Registry

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

# Opacus is imported on first use, not with this module: its package import costs ~1-2 s of
# every process start (issue #15), and a non-private run never accounts anything.


@lru_cache(maxsize=1)
def rdp_orders() -> tuple[float, ...]:
    """RDP orders: Opacus' defaults (1.1 .. 63) extended to 512. Small sampling rates
    (q = cohort / clients ~ 1e-3) put the optimal order above Opacus' largest default order
    63, which would overstate ε (SPEC §3.1: "extend RDP orders up to at least 256")."""
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS) + tuple(float(a) for a in range(64, 513, 8))


def __getattr__(name: str) -> Any:  # noqa: ANN401 - PEP 562: RDP_ORDERS, computed on first use
    if name == "RDP_ORDERS":
        return rdp_orders()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: One event of the history: (noise multiplier z, sample rate q, number of steps).
Event = tuple[float, float, int]


class Accountant(ABC):
    """Tracks the composition of Poisson-sampled Gaussian mechanisms and reports ε(δ).

    Subclasses only choose the Opacus accountant (:attr:`opacus_name`, a class of
    ``opacus.accountants``) and the keyword arguments its ``get_epsilon`` needs
    (:meth:`epsilon_kwargs`); calibration
    (:func:`fedpeft.privacy.calibration.noise_multiplier_for`) uses the same ones, so the
    z it returns reproduces the target ε under this accountant.
    """

    name: ClassVar[str]
    opacus_name: ClassVar[str]

    @classmethod
    def opacus_class(cls) -> type[IAccountant]:
        import opacus.accountants

        return getattr(opacus.accountants, cls.opacus_name)

    @classmethod
    def epsilon_kwargs(cls) -> dict[str, Any]:
        return {}

    def __init__(self) -> None:
        self._opacus = self.opacus_class()()

    # -- events -------------------------------------------------------------------------
    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` compositions of the Poisson-sampled Gaussian mechanism."""
        z, q, n = float(noise_multiplier), float(sample_rate), int(num_steps)
        if not (math.isfinite(z) and z > 0):
            raise ValueError(f"noise multiplier {z} must be finite and > 0 to be accounted")
        if not 0 < q <= 1:
            raise ValueError(f"sample rate {q} outside (0, 1]")
        if n < 0:
            raise ValueError(f"num_steps {n} must be >= 0")
        if n == 0:
            return
        history = self._opacus.history
        # Same run-length merge Opacus' own step() does, for n steps at once.
        if history and history[-1][0] == z and history[-1][1] == q:
            history[-1] = (z, q, history[-1][2] + n)
        else:
            history.append((z, q, n))

    @property
    def opacus_accountant(self) -> IAccountant:
        """The wrapped Opacus accountant, shared, not copied.

        For sample-level DP-SGD (SPEC §3.2) hand it to the client's ``PrivacyEngine``
        before ``make_private`` (``engine.accountant = acc.opacus_accountant``): Opacus'
        optimizer hook then records every noisy step here, and the state persists across
        rounds through :meth:`state_dict`. Read ε with :meth:`epsilon` (extended orders).
        """
        return self._opacus

    @property
    def history(self) -> list[Event]:
        return [(float(z), float(q), int(n)) for z, q, n in self._opacus.history]

    @property
    def steps(self) -> int:
        """Total number of mechanism invocations recorded."""
        return sum(n for _, _, n in self._opacus.history)

    # -- guarantee ----------------------------------------------------------------------
    def epsilon(self, delta: float) -> float:
        """ε spent so far at this δ (0 before the first step)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta {delta} outside (0, 1)")
        if not self._opacus.history:
            return 0.0
        key = (self.name, tuple(self.history), float(delta))
        if key not in _EPSILONS:  # each round asks for the same ε twice (budget check, report)
            if len(_EPSILONS) >= 1024:
                _EPSILONS.clear()
            _EPSILONS[key] = float(self._opacus.get_epsilon(delta=delta, **self.epsilon_kwargs()))
        return _EPSILONS[key]

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: the accountant's name and its event history."""
        return {"accountant": self.name, "history": [list(e) for e in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("accountant") != self.name:
            raise ValueError(f"state of accountant {state.get('accountant')!r} cannot be "
                             f"loaded into a {self.name!r} accountant")
        self._opacus.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]

    def copy(self) -> Accountant:
        twin = type(self)()
        twin.load_state_dict(self.state_dict())
        return twin

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, events={len(self._opacus.history)})"


#: ε by (accountant, event history, δ): a pure function of its key, computed by Opacus once
_EPSILONS: dict[tuple[str, tuple[Event, ...], float], float] = {}

ACCOUNTANTS: Registry[type[Accountant]] = Registry("accountant")


@ACCOUNTANTS.register("rdp")
class RdpAccountant(Accountant):
    """Rényi DP (Mironov 2017; Mironov et al. 2019 for the sampled Gaussian) via Opacus,
    converted to (ε, δ) over :func:`rdp_orders`."""

    name = "rdp"
    opacus_name = "RDPAccountant"

    @classmethod
    def epsilon_kwargs(cls) -> dict[str, Any]:
        return {"alphas": list(rdp_orders())}


@ACCOUNTANTS.register("prv")
class PrvAccountant(Accountant):
    """Privacy-loss random variables (Gopi et al. 2021) via Opacus: a numerically tight
    upper bound on ε (Opacus returns the upper end of its ``eps_error`` window)."""

    name = "prv"
    opacus_name = "PRVAccountant"


def repeated_epsilon(accountant: str, noise_multiplier: float, sample_rate: float, steps: int,
                     delta: float) -> float:
    """ε at ``delta`` of ``steps`` compositions of one Poisson-sampled Gaussian mechanism: what
    ``make_accountant(accountant)`` reports after ``step(noise_multiplier, sample_rate, steps)``
    (0 for no steps). For RDP the one-step RDP curve of ``(z, q)`` is computed once and scaled,
    exactly as Opacus' ``compute_rdp`` does, so a curve over many step counts costs one
    ``compute_rdp`` (the planned sample-level bound asks for one per round)."""
    if steps <= 0:
        return 0.0
    if accountant != RdpAccountant.name:
        acc = make_accountant(accountant)
        acc.step(noise_multiplier, sample_rate, steps)
        return acc.epsilon(delta)
    from opacus.accountants.analysis import rdp as analysis

    rdp = sum([_one_step_rdp(float(noise_multiplier), float(sample_rate)) * int(steps)])
    eps, _ = analysis.get_privacy_spent(orders=list(rdp_orders()), rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=1024)
def _one_step_rdp(noise_multiplier: float, sample_rate: float) -> Any:  # noqa: ANN401 - ndarray
    from opacus.accountants.analysis import rdp as analysis

    return analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                orders=list(rdp_orders()))


def make_accountant(name: str) -> Accountant:
    """A fresh accountant by registry name ("rdp", "prv"); UsageError on unknown names."""
    return ACCOUNTANTS.get(name)()


__all__ = ["ACCOUNTANTS", "Accountant", "Event", "PrvAccountant", "RdpAccountant",
           "make_accountant", "rdp_orders", "repeated_epsilon"]
