"""The strategy interface of fedpeft's core: a real Flower :class:`Strategy` base, and the
``--strategy`` registry whose implementations live in the top-level ``strategies/`` package
(loaded by name, see :mod:`fedpeft.registry`).

Sampling (Poisson, through a sampler object), message building and reply decoding live
here; a concrete strategy only implements :meth:`FedPeftStrategy.aggregate`, a pure function
of the global state and the decoded client updates. Privacy and compression wrap strategies
rather than living inside them (see Flower's ``dp_fixed_clipping.py`` for the pattern).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.adapters.base import Adapter, State
from fedpeft.aggregation import lora_aggregation_error
from fedpeft.federation.records import from_record, payload_bytes, to_record
from fedpeft.federation.messages import CLIENT_ID_KEY
from fedpeft.federation.upload import decode_upload
from fedpeft.federation.validation import Layout, check_update
from fedpeft.registry import Registry
from fedpeft.server_optim import NoServerOptimizer, ServerOptimizer, build_server_optimizer

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


class FedPeftStrategy(Strategy):
    """Base for adapter-aware strategies; subclasses implement :meth:`aggregate`."""

    name: ClassVar[str]
    #: True when the strategy must see each client's own update (cannot sit behind
    #: secure aggregation or user-level central DP noise), e.g. LoRA-FAIR.
    needs_individual_updates: ClassVar[bool] = False
    #: True when clients may train different LoRA ranks (``--client-ranks``), e.g. FLoRA.
    heterogeneous_ranks: ClassVar[bool] = False
    #: False when the global state is rebuilt every round (FLoRA), so a server optimiser's
    #: pseudo-gradient would mix unrelated states.
    supports_server_optimizer: ClassVar[bool] = True

    def __init__(self, adapter: Adapter, sampler: ClientSampler) -> None:
        self.adapter = adapter
        self.sampler = sampler
        self._global: State = {}
        self._round_rank: int | None = None
        self._broadcast_bytes = 0
        #: ``round_rank -> {key: shape}`` of an honest upload; None disables shape checks
        self.upload_layout: Callable[[int | None], Layout] | None = None
        #: largest accepted reply payload in bytes (0 = no limit)
        self.max_upload_bytes = 0
        #: simulated seconds after which a reply counts as a straggler (0 = no deadline)
        self.deadline_s = 0.0
        #: ``(client id, reason)`` of the replies refused in the last round
        self.rejections: list[tuple[int, str]] = []
        self.late = 0
        #: applied to every aggregate (SPEC §3.6); "none" at lr 1 returns it unchanged
        self.server_opt: ServerOptimizer = NoServerOptimizer()

    @classmethod
    def from_config(cls, adapter: Adapter, sampler: ClientSampler, cfg: RunConfig) -> FedPeftStrategy:
        """Build from the run config (with its server optimiser). Strategies with options of
        their own override :meth:`_from_config`."""
        strategy = cls._from_config(adapter, sampler, cfg)
        strategy.server_opt = build_server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum,
                                                     cfg.server_beta2, cfg.server_tau)
        return strategy

    @classmethod
    def _from_config(cls, adapter: Adapter, sampler: ClientSampler, cfg: RunConfig) -> FedPeftStrategy:
        return cls(adapter, sampler)

    def server_step(self, global_state: State, aggregate: State) -> State:
        """The next global state: the server optimiser's step on ``aggregate − global``."""
        return self.server_opt.step(global_state, aggregate)

    @classmethod
    def refusal(cls, cfg: RunConfig) -> str | None:
        """Why this strategy cannot run ``cfg`` (checked by config validation), or None."""
        return None

    def initial_global(self, initial: State, frozen_base: State) -> State:
        """The round-1 global state. ``initial`` is the adapter's trainable state, and
        ``frozen_base`` the pristine frozen weights of the adapted layers (strategies that
        fold updates into the base, like FLoRA, carry them in the global state)."""
        return initial

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

    # -- Flower Strategy API ----------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = from_record(arrays)
        rank = config.get("round-rank", 0)
        self._round_rank = int(rank) if rank else None
        broadcast = to_record(self.broadcast_state(self._global, self._round_rank))
        self._broadcast_bytes = payload_bytes(broadcast)
        # one shared broadcast record; each message names its logical client, so a node can
        # serve any number of clients (simulation) or check that it is the one (deployment)
        return [Message(content=RecordDict({"arrays": broadcast,
                                            "config": ConfigRecord({**config, CLIENT_ID_KEY: client})}),
                        message_type=MessageType.TRAIN, dst_node_id=node)
                for client, node in self.sampler.sample(server_round)]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        updates = self.accept(replies)
        metrics = self.round_metrics(replies, updates)
        usable = [u for u in updates if u.num_examples > 0]
        if not usable:
            return None, MetricRecord(metrics)
        new_global = self.aggregate(self._global, usable)
        err = self.aggregation_error(self._global, usable, new_global)
        if err is not None:  # of the aggregate itself, before the server optimiser moves it
            metrics["aggregation-error"] = err
        return to_record(self.server_step(self._global, new_global)), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # fedpeft evaluates the global model centrally on the server

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "\t├── strategy: %s (adapter %s)", self.name, self.adapter.name)

    # -- round state, read by wrappers (DP, ...) -------------------------------------------
    @property
    def global_state(self) -> State:
        """The global trainable state sent this round (set in :meth:`configure_train`)."""
        return self._global

    @property
    def round_rank(self) -> int | None:
        return self._round_rank

    @property
    def broadcast_bytes(self) -> int:
        """Serialized size of this round's (dense) broadcast to one client."""
        return self._broadcast_bytes

    def accept(self, replies: Sequence[Message]) -> list[ClientUpdate]:
        """Decode the replies that arrived; refuse malformed or late ones (with reasons)."""
        self.rejections, self.late = [], 0
        accepted = []
        for reply in replies:
            if reply.has_error():
                continue  # a failed client (dropout, crash): counted in clients-failed
            client = _client_id(reply)
            size = payload_bytes(reply.content["arrays"]) if "arrays" in reply.content else 0
            if self.max_upload_bytes and size > self.max_upload_bytes:
                self.rejections.append((client, f"payload of {size} bytes over the limit {self.max_upload_bytes}"))
                continue
            try:
                update = self.decode(reply)
            except Exception as exc:  # noqa: BLE001 - any malformed reply is refused, never fatal
                self.rejections.append((client, f"undecodable reply ({type(exc).__name__}: {exc})"))
                continue
            if self.deadline_s and update.metrics.get("simulated-latency", 0.0) > self.deadline_s:
                self.late += 1
                continue
            if update.num_examples < 0:
                self.rejections.append((client, f"negative example count {update.num_examples}"))
                continue
            # every reply is checked the same way whatever its example count: a client with
            # no data sends a zero update of the honest layout, never an empty or free-form one
            reason = check_update(update.state, self.expected_layout(update.client_id))
            if reason is not None:
                self.rejections.append((client, reason))
                continue
            accepted.append(update)
        # no log here: whether clients may be named depends on the run's privacy level
        # (fedpeft.privacy.publication); the round loop logs the rejections when allowed
        return accepted

    def broadcast_state(self, global_state: State, round_rank: int | None) -> State:
        """What every sampled client receives (default: the adapter's broadcast)."""
        return self.adapter.broadcast(global_state, round_rank)

    def expected_layout(self, client_id: int) -> Layout | None:
        """Key -> shape of an honest upload of ``client_id`` this round (None: unchecked)."""
        return self.upload_layout(self._round_rank) if self.upload_layout else None

    def round_metrics(self, replies: Sequence[Message], updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """The per-round keys of the results schema that every strategy reports."""
        metrics: dict[str, float] = {
            "clients-replied": float(len(updates)),
            "clients-failed": float(sum(1 for r in replies if r.has_error())),
            "rejected": float(len(self.rejections)),
            "late": float(self.late),
            "bytes-up": float(sum(u.bytes_up for u in updates)),
            "bytes-down": float(self._broadcast_bytes * len(replies)),
        }
        # sample-level DP: each client reports its own ε; the run's guarantee is the maximum
        nodes = {u.metrics["worker-node"] for u in updates if u.metrics.get("worker-node")}
        if nodes:  # a systems figure: how many Ray nodes the cohort ran on
            metrics["worker-nodes"] = float(len(nodes))
        eps = [u.metrics["epsilon"] for u in updates if "epsilon" in u.metrics]
        if eps:
            metrics["epsilon-max"] = max(eps)
        zs = [u.metrics["noise-multiplier"] for u in updates if "noise-multiplier" in u.metrics]
        if zs:
            metrics["noise-multiplier-min"] = min(zs)
        usable = [u for u in updates if u.num_examples > 0]
        if usable:
            total = float(sum(u.num_examples for u in usable))
            metrics["train-loss"] = sum(u.train_loss * u.num_examples for u in usable) / total
            metrics["num-examples"] = total
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable strategy state for checkpoints (stateless strategies: empty)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name} keeps no state but the checkpoint has {sorted(state)}")

    # -- to implement ------------------------------------------------------------------
    @abstractmethod
    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        """New global trainable state from this round's client updates."""

    # -- helpers -----------------------------------------------------------------------
    def decode(self, reply: Message) -> ClientUpdate:
        """A reply as a :class:`ClientUpdate` (compressed uploads are decoded against the
        round's global state)."""
        record = reply.content["arrays"]
        m = reply.content["metrics"]
        return ClientUpdate(
            node_id=reply.metadata.src_node_id,
            client_id=int(m.get("client-id", -1)),
            num_examples=int(m["num-examples"]),
            state=decode_upload(record, self._global),
            train_loss=float(m.get("train-loss", float("nan"))),
            bytes_up=payload_bytes(record),
            metrics={k: float(v) for k, v in m.items()},
        )


def _client_id(reply: Message) -> int:
    try:
        return int(reply.content["metrics"]["client-id"])
    except Exception:  # noqa: BLE001
        return -1


def stack_uploads(updates: Sequence[ClientUpdate]) -> tuple[list[State], list[float]]:
    return [u.state for u in updates], [float(u.num_examples) for u in updates]


#: ``--strategy`` name -> strategy class; the classes register from ``strategies/``
STRATEGIES: Registry[type[FedPeftStrategy]] = Registry("strategy", plugins="strategies")

__all__ = ["STRATEGIES", "ClientSampler", "ClientUpdate", "FedPeftStrategy", "stack_uploads", "torch"]
