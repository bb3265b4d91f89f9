"""The server's round loop: sample, train, aggregate, evaluate, report.

Drives a :class:`strategies.FedPeftStrategy` through Flower's Strategy API on any
:class:`flwr.serverapp.Grid` — the in-memory grid of the simulation engine or a SuperLink's.
Under DP the reporters see only what the guarantee covers
(:mod:`fedpeft.privacy.publication`); the full records go to the diagnostics file when the
user asks for it (``--diagnostics``) and into the server-private checkpoint.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid

from fedpeft.adapters.base import State
from fedpeft.config import RunConfig
from fedpeft.errors import UsageError
from fedpeft.records import from_record, payload_bytes, to_record
from fedpeft.federation.central_eval import VALIDATION, Evaluator, local_evaluator
from fedpeft.engine.checkpoint import (CHECKPOINT_DIR, Checkpoint, record_attempt, restore_client_state,
                                          save_checkpoint)
from fedpeft.federation.downlink import build_downlink
from fedpeft.engine.privacy_plan import build_privacy
from fedpeft.engine.client_state import client_state_dir
from fedpeft.federation.round import RoundStrategy
from fedpeft.federation.messages import CLIENT_ID_KEY
from fedpeft.layout import honest_upload_layout
from fedpeft.engine.sampling import Cohorts, PoissonSampler, Roster
from fedpeft.federation.discovery import discover_clients
from fedpeft.threads import process_cores
from fedpeft.engine.workspace import Workspace, get_workspace
from fedpeft.pipeline import BuildEnv, Pipeline
from fedpeft.planning.forecast import config_plan
from fedpeft.iterate_average import IterateAverage
from fedpeft.server_optim import build_server_optimizer
from fedpeft.stages.compression import codec_for
from fedpeft.privacy.publication import DiagnosticsWriter, Publication
from fedpeft.privacy.randomness import discard_key
from fedpeft.reporting import Reporter
from fedpeft.results import FinalRecord, RoundRecord
from fedpeft.strategy import STRATEGIES


@dataclass(frozen=True)
class RunOutcome:
    final: FinalRecord
    #: the published records (under DP: only what the guarantee covers)
    rounds: list[RoundRecord]
    #: the full records, including what a DP run does not publish (in-process callers only)
    unpublished: list[RoundRecord]


def _dense_bytes(state: dict[str, torch.Tensor]) -> int:
    """Serialized size of ``state`` sent uncompressed (what Flower ships)."""
    return payload_bytes(to_record(state))


def round_state(strategy: RoundStrategy) -> dict[str, Any]:
    """The strategy's and the stages' checkpointable state (the user-dp accountant, ...)."""
    return {"strategy": strategy.strategy.state_dict(), "stages": strategy.pipeline.state_dict()}


def load_round_state(strategy: RoundStrategy, state: dict[str, Any]) -> None:
    if "accountant" in state:  # checkpoints written before the update pipeline (2026-11-30)
        state = {"stages": {"user-dp": state}}
    strategy.strategy.load_state_dict(dict(state.get("strategy", {})))
    strategy.pipeline.load_state_dict(dict(state.get("stages", {})))


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
    publication = Publication(privacy.private, cfg.cohort)
    # reporters see the published records; `unfiltered` (the --diagnostics file) the full ones
    unfiltered: list[Reporter] = ([DiagnosticsWriter(cfg.output, privacy.private)]
                                  if cfg.diagnostics and cfg.output else [])
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
    shared_layout = strategy.shared_layout
    dense_up: dict[int | None, int] = {}  # round rank -> bytes of one dense upload
    plan = {"clients": cfg.clients, "expected_cohort": cfg.cohort, "sample_rate": rate,
            "rounds": cfg.rounds, "adapter": cfg.adapter, "strategy": cfg.strategy,
            "trainable_parameters": sum(v.numel() for v in ws.initial_state.values()),
            "train_examples": ws.train_examples, "test_examples": len(ws.test),
            **({"validation_examples": len(ws.holdout.validation_rows)} if ws.holdout is not None else {}),
            "num_labels": ws.splits.num_labels, "privacy": privacy.plan(),
            # encoder layers run once per example instead of every client visit (--train-top-k)
            "cached_layers": ws.cached_layers,
            "pipeline": pipeline.describe(cfg.strategy, cfg.server_opt,
                                          f"{cfg.compression} with error feedback" if cfg.compress_down else "dense"),
            "utility": config_plan(cfg, shared_layout(None), ws.train_examples, privacy.delta,
                                   privacy.noise_multiplier).as_dict()}
    for r in reporters:
        r.on_start(cfg.to_dict(), publication.plan(plan))
    for r in unfiltered:
        r.on_start(cfg.to_dict(), plan)

    # a FLoRA run in this process may have folded updates into the cached model's base
    ws.adapter.load_state(ws.model, ws.frozen_base)
    global_state = strategy.strategy.initial_global(ws.initial_state, ws.frozen_base)
    downlink = build_downlink(cfg.compress_down, codec_for(cfg) if cfg.compress_down else None,
                              global_state)
    records: list[RoundRecord] = []  # full records: server-private (checkpoint, diagnostics)
    published: list[RoundRecord] = []  # what the reporters saw
    client_state = client_state_dir(cfg, {})
    if resume is None:
        shutil.rmtree(client_state, ignore_errors=True)  # never inherit residuals/accountants
    else:
        global_state = {k: v.clone() for k, v in resume.global_state.items()}
        records = list(resume.records)
        published = list(resume.published) if resume.published is not None else list(records)
        load_round_state(strategy, resume.strategy_state)
        privacy.load_state_dict(resume.privacy_state)
        if privacy.fresh_attempts:  # attempts after the checkpoint may have released models
            privacy.add_attempts(len(resume.attempts))
        downlink.load_state_dict(resume.downlink_state, resume.downlink_tensors)
        if resume.server_opt_state:
            strategy.server_opt.load_state_dict(resume.server_opt_state, resume.server_opt_tensors)
        restore_client_state(Path(cfg.output or "."), client_state,
                             keep=("accountants",) if privacy.fresh_attempts else ())
        for full, public in zip(records, published):
            for r in reporters:
                r.on_round(public)
            for r in unfiltered:
                r.on_round(full)
    if cfg.output:
        # per-client files are named by client id: who was ever sampled is private state, not
        # a result (owner-only, like the checkpoint)
        client_state.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(client_state, 0o700)
    evaluate_global = (evaluator or local_evaluator)(ws)
    # --validation-fraction: the same model scored on the held-out training rows, at the same rounds
    evaluate_validation = (evaluator or local_evaluator)(ws, VALIDATION) if ws.holdout is not None else None
    # --ema: the model evaluated and exported is the average of the iterates (post-processing)
    average = IterateAverage(cfg.ema) if cfg.ema else None
    if average is not None and resume is not None:
        average.load_state_dict(resume.ema_state, resume.ema_tensors)

    def published_model(state: State) -> State:
        return average.average(state) if average is not None else state
    # under DP, every round attempt after the last checkpoint of this run is written to its
    # ledger before the round's first message leaves (fedpeft.engine.checkpoint)
    ledger = (resume is not None and privacy.fresh_attempts and bool(cfg.output)
              and (Path(cfg.output) / CHECKPOINT_DIR).is_dir())
    for server_round in range(len(records) + 1, cfg.rounds + 1):
        stop = privacy.stop_reason()
        if stop is not None:
            log(WARNING, "round %d not run: %s", server_round, stop)
            break
        if ledger:
            record_attempt(Path(cfg.output), server_round)
        t_round = time.perf_counter()
        rank = ws.adapter.round_rank(np.random.default_rng([cfg.seed, 0xD1, server_round]))
        config = ConfigRecord({**cfg.to_client_flat(), **privacy.round_config(),
                               "server-round": server_round, "round-rank": rank or 0})
        sent = downlink.prepare(global_state, server_round)
        messages = list(strategy.configure_train(server_round, to_record(sent), config, grid))
        replies = (list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
                   if messages else [])
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        m = dict(metrics) if metrics is not None else {}
        failed = sum(1 for rep in replies if rep.has_error()) + len(messages) - len(replies)
        if publication.names_clients:  # under DP, who failed or was refused is not published
            if failed:
                log(WARNING, "round %d: %d of %d sampled clients failed or timed out; "
                    "aggregating the %d replies", server_round, failed, len(messages),
                    len(messages) - failed)
            for client, why in strategy.rejections:
                log(WARNING, "rejected update of client %d: %s", client, why)
        if arrays is not None:
            global_state = downlink.absorb(global_state, sent, from_record(arrays))
        if average is not None:
            average.update(global_state)
        bytes_down = downlink.bytes_down([int(msg.content["config"][CLIENT_ID_KEY]) for msg in messages],
                                         server_round)
        # central evaluation costs more than a small cohort's training: --eval-every thins it,
        # the last round is always evaluated (final accuracy)
        due = server_round % cfg.eval_every == 0 or server_round == cfg.rounds
        evaluated = published_model(global_state) if due else None
        ev = evaluate_global(evaluated) if evaluated is not None else None
        val = evaluate_validation(evaluated) if evaluated is not None and evaluate_validation is not None else None
        record = RoundRecord(
            round=server_round, clients_sampled=len(messages),
            train_loss=m.get("train-loss"), **ws.task.round_metrics(ev),
            bytes_up=int(m.get("bytes-up", 0)), bytes_down=int(m.get("bytes-down", 0)) if bytes_down is None else bytes_down,
            aggregation_error=m.get("aggregation-error"), epsilon=privacy.observe_round(m, server_round),
            aggregation_error_outside_span=m.get("aggregation-error-outside-span"),
            validation_loss=val.loss if val else None, validation_accuracy=val.accuracy if val else None,
            rank=ws.adapter.rank_in_force(rank), wall_s=time.perf_counter() - t_round,
            clients_failed=failed, stragglers=int(m.get("late", 0)), rejected=len(strategy.rejections),
            rejections=[f"client {c}: {why}" for c, why in strategy.rejections],
            personalized_accuracy=m.get("personalized-accuracy"),
            personalized_majority=m.get("personalized-majority"),
            worker_nodes=int(m["worker-nodes"]) if "worker-nodes" in m else None,
            reported_epsilon_max=m.get("epsilon-max"),
        )
        if rank not in dense_up:
            dense_up[rank] = _dense_bytes({k: torch.zeros(s) for k, s in shared_layout(rank).items()})
        public = publication.round(record, dense_up=dense_up[rank], dense_down=strategy.broadcast_bytes)
        records.append(record)
        published.append(public)
        for r in reporters:
            r.on_round(public)
        for r in unfiltered:
            r.on_round(record)
        if cfg.checkpoint_every and cfg.output and server_round % cfg.checkpoint_every == 0:
            opt_state, opt_tensors = strategy.server_opt.state_dict()
            ema_state, ema_tensors = average.state_dict() if average is not None else ({}, {})
            save_checkpoint(Path(cfg.output), Checkpoint(
                round=server_round, global_state=global_state, records=records,
                strategy_state=round_state(strategy), privacy_state=privacy.state_dict(),
                downlink_state=downlink.state_dict(), downlink_tensors=downlink.tensors(),
                streams=streams, published=published,
                server_opt_state=opt_state, server_opt_tensors=opt_tensors,
                ema_state=ema_state, ema_tensors=ema_tensors), client_state)
            ledger = privacy.fresh_attempts

    wall = time.perf_counter() - t0
    if cfg.output:  # the final global model in the standard peft layout (fedpeft.export)
        from fedpeft.export import MODEL_DIR, export_model
        export_model(ws, published_model(global_state), cfg, Path(cfg.output) / MODEL_DIR)

    def final_of(rs: list[RoundRecord]) -> FinalRecord:
        return FinalRecord(
            accuracy=next((r.eval_accuracy for r in reversed(rs) if r.eval_accuracy is not None), None),
            eval_loss=next((r.eval_loss for r in reversed(rs) if r.eval_loss is not None), None),
            perplexity=next((r.eval_perplexity for r in reversed(rs) if r.eval_perplexity is not None), None),
            validation_accuracy=next((r.validation_accuracy for r in reversed(rs)
                                      if r.validation_accuracy is not None), None),
            sample_rate=rate, **privacy.final_fields(),
            bytes_up_total=sum(r.bytes_up for r in rs), bytes_down_total=sum(r.bytes_down for r in rs),
            wall_s=wall)

    final = final_of(published)
    for r in reporters:
        r.on_finish(final)
    for r in unfiltered:
        r.on_finish(final_of(records))
    if cfg.output:
        # the run is complete and its final model published: nothing will resume it, so the
        # server's secret does not stay on disk beside the model (issue 24, finding 8)
        discard_key(Path(cfg.output) / CHECKPOINT_DIR)
    return RunOutcome(final=final, rounds=published, unpublished=records)
