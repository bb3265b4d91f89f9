"""What the server's round loop holds, as plain Python: the run's state between rounds, the
contexts its callbacks (:mod:`fedpeft.engine.callbacks`) receive, and the records it builds.

The Flower layer (``fedpeft.federation.server``) fills these in: it builds the run, sends and
receives each round's messages and hands a :class:`RoundResult` to the callbacks. Everything
here is Flower-free, so a callback can be tested on a hand-made run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fedpeft.adapters.base import State
from fedpeft.planning.forecast import config_plan
from fedpeft.results import FinalRecord, RoundRecord

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.engine.checkpoint import Checkpoint
    from fedpeft.engine.privacy_plan import PrivacyLevel
    from fedpeft.engine.workspace import Workspace
    from fedpeft.iterate_average import IterateAverage
    from fedpeft.pipeline import Layout, Pipeline
    from fedpeft.privacy.randomness import RandomStreams
    from fedpeft.server_optim import ServerOptimizer
    from fedpeft.strategy import FedPeftStrategy


class Broadcast(Protocol):
    """The checkpointable part of the server's broadcast (``federation/downlink.py``: under
    ``--compress-down`` the clients' mirror of the global model and who holds which round)."""

    def state_dict(self) -> dict[str, Any]: ...

    def tensors(self) -> State: ...

    def load_state_dict(self, state: dict[str, Any], tensors: State) -> None: ...


@dataclass
class ServerState:
    """Everything the rest of a run depends on, as the server holds it between rounds: what a
    checkpoint saves and a resume restores (:class:`fedpeft.engine.callbacks.CheckpointCallback`)."""

    global_state: State
    strategy: FedPeftStrategy
    pipeline: Pipeline
    server_opt: ServerOptimizer
    downlink: Broadcast
    privacy: PrivacyLevel
    #: the run's cohort/noise randomness (secret under DP: the checkpoint keeps its key)
    streams: RandomStreams
    #: ``--ema``: the iterate average evaluated and exported instead of the last iterate
    average: IterateAverage | None = None
    #: the full records: server-private (checkpoint, ``--diagnostics``)
    records: list[RoundRecord] = field(default_factory=list)
    #: the records as published (under DP: only what the guarantee covers)
    published: list[RoundRecord] = field(default_factory=list)

    def advance(self, global_state: State) -> None:
        """The round's new global model (and, under ``--ema``, the average's next step)."""
        self.global_state = global_state
        if self.average is not None:
            self.average.update(global_state)

    def released_model(self) -> State:
        """The model this run evaluates and exports: the iterate average under ``--ema``
        (post-processing of released models, so no privacy cost), else the global model."""
        if self.average is None:
            return self.global_state
        return self.average.average(self.global_state)


@dataclass
class RunContext:
    """One run as its callbacks see it: the settings, the workspace, the server state and the
    plan, plus what callbacks hand on to each other (the published plan, the wall time)."""

    cfg: RunConfig
    ws: Workspace
    state: ServerState
    #: what the run is about to do (the full form; :class:`PublishCallback` makes the public one)
    plan: dict[str, Any]
    #: the checkpoint this run continues, or None for a fresh run
    resume: Checkpoint | None = None
    #: the plan as published: set by ``PublishCallback.on_start``
    published_plan: dict[str, Any] | None = None
    #: seconds from the start to the end of the last round (export excluded): set by the driver
    wall_s: float = 0.0

    @property
    def privacy(self) -> PrivacyLevel:
        return self.state.privacy

    @property
    def sample_rate(self) -> float:
        """q: each client's chance to be in a round's (Poisson) cohort."""
        return self.cfg.cohort / self.cfg.clients

    def final(self, published: bool = True) -> FinalRecord:
        """results.json's ``final`` from the published records (or, ``published=False``, the full ones)."""
        return final_record(self.state.published if published else self.state.records, self)


@dataclass(frozen=True)
class RoundResult:
    """One round as the Flower layer leaves it: trained and aggregated, not yet evaluated.
    Server-private: under DP only what :mod:`fedpeft.privacy.publication` covers may leave."""

    server_round: int
    #: ``time.perf_counter()`` when the round started (its wall time includes evaluation)
    started: float
    #: the round's rank draw (DP-DyLoRA), None when the adapter has no per-round rank
    rank: int | None
    #: the aggregated round metrics (:class:`fedpeft.federation.round.RoundStrategy`)
    metrics: dict[str, float]
    clients_sampled: int
    #: sampled clients that failed or did not reply in time
    clients_failed: int
    #: ``(client id, reason)`` of the replies the server refused
    rejections: list[tuple[int, str]]
    #: bytes the downlink sent (None: the strategy's count in ``metrics``)
    bytes_down: int | None
    #: bytes of one client's dense upload / broadcast this round (the publication's planned figures)
    dense_up: int
    dense_down: int


@dataclass
class RoundContext:
    """A finished round for ``Callback.on_round``: the result, its complete (full) record and,
    once :class:`PublishCallback` has run, its published form."""

    run: RunContext
    result: RoundResult
    record: RoundRecord
    published: RoundRecord | None = None

    @property
    def server_round(self) -> int:
        return self.result.server_round


def run_plan(cfg: RunConfig, ws: Workspace, privacy: PrivacyLevel, pipeline: Pipeline,
             shared_layout: Layout) -> dict[str, Any]:
    """The run's plan (results.json ``plan``): sizes, privacy, pipeline and the planner's
    utility forecast. ``shared_layout``: what an honest client uploads after its stages."""
    return {"clients": cfg.clients, "expected_cohort": cfg.cohort, "sample_rate": cfg.cohort / cfg.clients,
            "rounds": cfg.rounds, "adapter": cfg.adapter, "strategy": cfg.strategy,
            "trainable_parameters": sum(v.numel() for v in ws.initial_state.values()),
            "train_examples": ws.train_examples, "test_examples": len(ws.test),
            **({"validation_examples": len(ws.holdout.validation_rows)} if ws.holdout is not None else {}),
            "num_labels": ws.splits.num_labels, "privacy": privacy.plan(),
            # encoder layers run once per example instead of every client visit (--train-top-k)
            "cached_layers": ws.cached_layers,
            "pipeline": pipeline.describe(cfg.strategy, cfg.server_opt,
                                          f"{cfg.compression} with error feedback" if cfg.compress_down else "dense"),
            "utility": config_plan(cfg, shared_layout, ws.train_examples, privacy.delta,
                                   privacy.noise_multiplier).as_dict()}


def round_record(run: RunContext, result: RoundResult, fields: dict[str, Any]) -> RoundRecord:
    """The full record of ``result``, with the callbacks' ``fields`` (evaluation) in; its
    wall time runs to now. Also tells the privacy level the round happened (its ε so far)."""
    m, server_round = result.metrics, result.server_round
    rejections = result.rejections
    return RoundRecord(**{
        "eval_loss": None, "eval_accuracy": None, **fields,
        "round": server_round, "clients_sampled": result.clients_sampled, "train_loss": m.get("train-loss"),
        "bytes_up": int(m.get("bytes-up", 0)),
        "bytes_down": int(m.get("bytes-down", 0)) if result.bytes_down is None else result.bytes_down,
        "aggregation_error": m.get("aggregation-error"),
        "epsilon": run.privacy.observe_round(m, server_round),
        "aggregation_error_outside_span": m.get("aggregation-error-outside-span"),
        "rank": run.ws.adapter.rank_in_force(result.rank), "wall_s": time.perf_counter() - result.started,
        "clients_failed": result.clients_failed, "stragglers": int(m.get("late", 0)),
        "rejected": len(rejections), "rejections": [f"client {c}: {why}" for c, why in rejections],
        "personalized_accuracy": m.get("personalized-accuracy"),
        "personalized_majority": m.get("personalized-majority"),
        "worker_nodes": int(m["worker-nodes"]) if "worker-nodes" in m else None,
        "reported_epsilon_max": m.get("epsilon-max"),
    })


def final_record(records: list[RoundRecord], run: RunContext) -> FinalRecord:
    """results.json's ``final``: the last evaluated scores of ``records``, the run's privacy
    figures and byte totals."""

    def last(name: str) -> float | None:
        return next((getattr(r, name) for r in reversed(records) if getattr(r, name) is not None), None)

    return FinalRecord(
        accuracy=last("eval_accuracy"), eval_loss=last("eval_loss"), perplexity=last("eval_perplexity"),
        validation_accuracy=last("validation_accuracy"),
        sample_rate=run.sample_rate, **run.privacy.final_fields(),
        bytes_up_total=sum(r.bytes_up for r in records), bytes_down_total=sum(r.bytes_down for r in records),
        wall_s=run.wall_s)


__all__ = ["Broadcast", "RoundContext", "RoundResult", "RunContext", "ServerState", "final_record",
           "round_record", "run_plan"]
