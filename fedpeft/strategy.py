"""The strategy interface of fedpeft's core and the ``--strategy`` registry, whose
implementations live in the top-level ``strategies/`` package (loaded by name, see
:mod:`fedpeft.registry`).

A strategy is aggregation proper: ``aggregate(global, updates) -> global``, a pure function
of the global state and the round's decoded, checked client updates. Everything else on the
update path (compression, DP, client-local tensors, rank truncation) is a stage of the
update pipeline (:mod:`fedpeft.pipeline`), and the Flower plumbing (sampling, messages,
reply checks, the server optimiser) is :class:`fedpeft.federation.round.RoundStrategy`; so
DP and compression compose with any strategy, a third-party one included, and a strategy is
testable on plain tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from fedpeft.adapters.base import Adapter, State
from fedpeft.aggregation import lora_aggregation_error
from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.config import RunConfig


class ClientSampler(Protocol):
    def sample(self, server_round: int) -> list[tuple[int, int]]:
        """``(logical client id, node id)`` of every client that trains this round."""


@dataclass
class ClientUpdate:
    """One decoded client reply."""

    node_id: int
    client_id: int
    num_examples: int
    state: State
    train_loss: float
    bytes_up: int
    metrics: dict[str, float] = field(default_factory=dict)


class FedPeftStrategy(ABC):
    """Base for adapter-aware strategies; subclasses implement :meth:`aggregate`."""

    name: ClassVar[str]
    #: True when the strategy must see each client's own update (cannot follow a stage that
    #: combines the cohort, such as user-level central DP), e.g. LoRA-FAIR.
    needs_individual_updates: ClassVar[bool] = False
    #: True when clients may train different LoRA ranks (``--client-ranks``), e.g. FLoRA.
    heterogeneous_ranks: ClassVar[bool] = False
    #: False when the global state is rebuilt every round (FLoRA), so a server optimiser's
    #: pseudo-gradient would mix unrelated states.
    supports_server_optimizer: ClassVar[bool] = True

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    @classmethod
    def from_config(cls, adapter: Adapter, cfg: RunConfig) -> FedPeftStrategy:
        """Build from the run config; strategies with options of their own override this."""
        return cls(adapter)

    @classmethod
    def refusal(cls, cfg: RunConfig) -> str | None:
        """Why this strategy cannot run ``cfg`` (checked by :func:`fedpeft.pipeline.refusals`),
        or None."""
        return None

    def initial_global(self, initial: State, frozen_base: State) -> State:
        """The round-1 global state. ``initial`` is the adapter's trainable state, and
        ``frozen_base`` the pristine frozen weights of the adapted layers (strategies that
        fold updates into the base, like FLoRA, carry them in the global state)."""
        return initial

    def broadcast_state(self, global_state: State, round_rank: int | None) -> State:
        """What every sampled client receives (default: the adapter's broadcast)."""
        return self.adapter.broadcast(global_state, round_rank)

    @abstractmethod
    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  round_rank: int | None = None) -> State:
        """New global trainable state from this round's client updates (``round_rank``:
        DP-DyLoRA's rank of the round, None for the full rank)."""

    def aggregation_error(self, global_state: State, updates: Sequence[ClientUpdate],
                          new_global: State) -> float | None:
        """SPEC §1.1 error of the state the server sends next, against the clients' exact
        weighted mean product ``Σ p_i B_i A_i``; None without LoRA pairs."""
        # frozen shared factors (FFA-LoRA's A) are not in the states but are in every product
        full = self.adapter.with_frozen_factors
        sent = full(new_global)
        return lora_aggregation_error(
            [full(self.adapter.client_view(global_state, u.state)) for u in updates],
            [u.num_examples for u in updates], sent, self.adapter.lora_pairs(set(sent)))

    def round_metrics(self, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """Strategy-specific per-round metrics from the accepted replies (default: none)."""
        return {}

    def aggregation_metrics(self) -> dict[str, float]:
        """Strategy-specific metrics of the last :meth:`aggregate` (default: none); read, like
        :meth:`aggregation_error`, only when the strategy saw the clients' own updates."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable strategy state for checkpoints (stateless strategies: empty)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name} keeps no state but the checkpoint has {sorted(state)}")


def stack_uploads(updates: Sequence[ClientUpdate]) -> tuple[list[State], list[float]]:
    return [u.state for u in updates], [float(u.num_examples) for u in updates]


#: ``--strategy`` name -> strategy class; the classes register from ``strategies/``
STRATEGIES: Registry[type[FedPeftStrategy]] = Registry("strategy", plugins="strategies")

__all__ = ["STRATEGIES", "ClientSampler", "ClientUpdate", "FedPeftStrategy", "stack_uploads"]
