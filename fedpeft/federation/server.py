"""The server's round loop on Flower: build the run, send each round's messages through a grid,
hand the aggregated round to the callbacks.

Drives a :class:`strategies.FedPeftStrategy` through Flower's Strategy API on any
:class:`flwr.serverapp.Grid` — the in-memory grid of the simulation engine or a SuperLink's.
What happens around a round is a callback each, without Flower (:mod:`fedpeft.engine.callbacks`):
central evaluation, checkpoints, the exported model, the DP publication policy (under DP the
reporters see only what the guarantee covers; the full records go to the diagnostics file when
the user asks for it, ``--diagnostics``, and into the server-private checkpoint) and the
reporters. This module is the Flower part: ConfigRecords, messages, ``grid.send_and_receive``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid

from fedpeft.compression import codec_for
from fedpeft.config import RunConfig
from fedpeft.engine.callbacks import Evaluator, complete_round, default_callbacks
from fedpeft.engine.checkpoint import Checkpoint
from fedpeft.engine.privacy_plan import build_privacy
from fedpeft.engine.run import RoundResult, RunContext, ServerState, run_plan
from fedpeft.engine.sampling import Cohorts, PoissonSampler, Roster
from fedpeft.engine.workspace import get_workspace
from fedpeft.errors import UsageError
from fedpeft.federation.central_eval import VALIDATION, local_evaluator
from fedpeft.federation.discovery import discover_clients
from fedpeft.federation.downlink import Downlink, build_downlink
from fedpeft.federation.messages import CLIENT_ID_KEY
from fedpeft.federation.round import RoundStrategy
from fedpeft.iterate_average import IterateAverage
from fedpeft.layout import honest_upload_layout
from fedpeft.pipeline import BuildEnv, Pipeline
from fedpeft.records import from_record, payload_bytes, to_record
from fedpeft.reporting import Reporter
from fedpeft.results import FinalRecord, RoundRecord
from fedpeft.server_optim import build_server_optimizer
from fedpeft.strategy import STRATEGIES
from fedpeft.threads import process_cores


@dataclass(frozen=True)
class RunOutcome:
    final: FinalRecord
    #: the published records (under DP: only what the guarantee covers)
    rounds: list[RoundRecord]
    #: the full records, including what a DP run does not publish (in-process callers only)
    unpublished: list[RoundRecord]


@dataclass
class FlowerRound:
    """The Flower half of a run: the grid, the strategy it speaks Flower's Strategy API to and
    the broadcast (dense, or compressed with ``--compress-down``)."""

    grid: Grid
    strategy: RoundStrategy
    downlink: Downlink
    #: round rank -> bytes of one dense upload (what the publication's planned figures use)
    dense_up: dict[int | None, int] = field(default_factory=dict)


def _dense_bytes(state: dict[str, torch.Tensor]) -> int:
    """Serialized size of ``state`` sent uncompressed (what Flower ships)."""
    return payload_bytes(to_record(state))


def run_federation(grid: Grid, cfg: RunConfig, reporters: list[Reporter],
                   resume: Checkpoint | None = None, roster: Roster | None = None,
                   evaluator: Callable[..., Evaluator] | None = None) -> RunOutcome:
    """Run (or, from ``resume``, continue) the federation described by ``cfg``.

    ``roster`` routes logical clients to nodes; None (a real federation) asks the grid's
    nodes which client each one is. ``evaluator(ws[, split])`` builds the central evaluation
    of the test split (or of ``split``, e.g. the validation rows; default: in this process).
    """
    t0 = time.perf_counter()
    torch.set_num_threads(process_cores())  # the affinity mask, capped by a cgroup CPU quota
    run, flower = build_run(grid, cfg, resume, roster)
    evaluate = evaluator or local_evaluator
    test, validation = evaluate(run.ws), evaluate(run.ws, VALIDATION) if run.ws.holdout is not None else None
    callbacks = default_callbacks(cfg, reporters, run.privacy.private, test, validation,
                                  warn=lambda message: log(WARNING, "%s", message))
    for callback in callbacks:
        callback.on_start(run)  # a resumed run's state is restored here (CheckpointCallback)
    for server_round in range(len(run.state.records) + 1, cfg.rounds + 1):
        stop = run.privacy.stop_reason()
        if stop is not None:
            log(WARNING, "round %d not run: %s", server_round, stop)
            break
        for callback in callbacks:
            callback.before_round(run, server_round)
        complete_round(run, train_round(flower, run, server_round), callbacks)
    run.wall_s = time.perf_counter() - t0
    for callback in callbacks:
        callback.on_finish(run)
    return RunOutcome(final=run.final(), rounds=run.state.published, unpublished=run.state.records)


def build_run(grid: Grid, cfg: RunConfig, resume: Checkpoint | None,
              roster: Roster | None) -> tuple[RunContext, FlowerRound]:
    """The run's parts before its first round: workspace, privacy level and its randomness
    (a resumed DP run keeps its checkpoint's key), cohort sampler, update pipeline, strategy,
    plan and initial global model. The checkpoint's state is put back later, by
    :class:`fedpeft.engine.callbacks.CheckpointCallback`."""
    ws = get_workspace(cfg)
    if roster is None:
        roster = discover_clients(grid, cfg.clients)
    rate = cfg.cohort / cfg.clients
    privacy = build_privacy(cfg, ws, rate)
    if (resume is not None and privacy.private and not cfg.insecure_reproducible_noise
            and resume.streams is None):
        raise UsageError("--resume: the checkpoint of this DP run has no privacy key: the run completed "
                         "(its key is deleted when the final model is published) or the checkpoint was "
                         "written by an older fedpeft; start a new run")
    streams = privacy.choose_streams(resume.streams if resume is not None else None)
    if privacy.warning:
        log(WARNING, "%s", privacy.warning)
    sampler = Cohorts(PoissonSampler(cfg.clients, rate, streams), roster)
    strategy_cls = STRATEGIES.get(cfg.strategy)
    pipeline = Pipeline.build(BuildEnv(cfg, strategy_cls, "server", privacy))
    privacy.bind(pipeline)
    strategy = RoundStrategy(
        strategy_cls.from_config(ws.adapter, cfg), pipeline, sampler,
        upload_layout=honest_upload_layout(ws.adapter, ws.model),
        server_opt=build_server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum,
                                          cfg.server_beta2, cfg.server_tau),
        max_upload_bytes=cfg.max_upload_bytes or 2 * _dense_bytes(ws.adapter.upload(ws.model, None)),
        deadline_s=cfg.deadline)
    # what an honest client uploads after its stages (e.g. without FedSA-LoRA's local B)
    plan = run_plan(cfg, ws, privacy, pipeline, strategy.shared_layout(None))
    # a FLoRA run in this process may have folded updates into the cached model's base
    ws.adapter.load_state(ws.model, ws.frozen_base)
    global_state = strategy.strategy.initial_global(ws.initial_state, ws.frozen_base)
    downlink = build_downlink(cfg.compress_down, codec_for(cfg) if cfg.compress_down else None, global_state)
    # --ema: the model evaluated and exported is the average of the iterates (post-processing)
    state = ServerState(global_state, strategy.strategy, pipeline, strategy.server_opt, downlink, privacy,
                        streams, average=IterateAverage(cfg.ema) if cfg.ema else None)
    return RunContext(cfg, ws, state, plan, resume), FlowerRound(grid, strategy, downlink)


def train_round(flower: FlowerRound, run: RunContext, server_round: int) -> RoundResult:
    """One round through Flower: the round's config and broadcast as records, a train message
    to every sampled client, their replies checked, decoded and aggregated into the new global
    model (:class:`RoundStrategy`)."""
    started = time.perf_counter()
    cfg, state, strategy = run.cfg, run.state, flower.strategy
    rank = run.ws.adapter.round_rank(np.random.default_rng([cfg.seed, 0xD1, server_round]))
    config = ConfigRecord({**cfg.to_client_flat(), **run.privacy.round_config(),
                           "server-round": server_round, "round-rank": rank or 0})
    sent = flower.downlink.prepare(state.global_state, server_round)
    messages = list(strategy.configure_train(server_round, to_record(sent), config, flower.grid))
    replies = list(flower.grid.send_and_receive(messages, timeout=cfg.round_timeout)) if messages else []
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    failed = sum(1 for rep in replies if rep.has_error()) + len(messages) - len(replies)
    state.advance(state.global_state if arrays is None
                  else flower.downlink.absorb(state.global_state, sent, from_record(arrays)))
    bytes_down = flower.downlink.bytes_down([int(msg.content["config"][CLIENT_ID_KEY]) for msg in messages],
                                            server_round)
    if rank not in flower.dense_up:
        layout = strategy.shared_layout(rank)
        flower.dense_up[rank] = _dense_bytes({k: torch.zeros(s) for k, s in layout.items()})
    return RoundResult(
        server_round=server_round, started=started, rank=rank, metrics=dict(metrics) if metrics is not None else {},
        clients_sampled=len(messages), clients_failed=failed, rejections=list(strategy.rejections),
        bytes_down=bytes_down, dense_up=flower.dense_up[rank], dense_down=strategy.broadcast_bytes)
