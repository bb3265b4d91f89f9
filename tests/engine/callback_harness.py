"""Helpers of tests/engine: a hand-made run for the round loop's callbacks: real settings, server optimiser, iterate
average, update pipeline and checkpoint files; small stand-ins for the parts a callback only
stores and restores (a strategy and a stage with a counter, the broadcast's ledger, a privacy
level). No Flower, no model: each test plays rounds the way the driver does."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fedpeft.config import RunConfig
from fedpeft.engine.callbacks import Callback, complete_round
from fedpeft.engine.checkpoint import Checkpoint
from fedpeft.engine.privacy_plan import PrivacyLevel
from fedpeft.engine.run import RoundContext, RoundResult, RunContext, ServerState
from fedpeft.iterate_average import IterateAverage
from fedpeft.pipeline import Pipeline, Stage
from fedpeft.server_optim import build_server_optimizer
from fedpeft.tasks import TASKS

KEYS = {"a": (3, 2), "b": (4,)}


class CountingStrategy:
    """A strategy whose checkpointable state is the number of rounds it aggregated."""

    name = "counting"

    def __init__(self) -> None:
        self.rounds = 0

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])


class CountingStage(Stage):
    """A stage with server state (as user-level DP keeps its accountant)."""

    name = "counting"

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])


class LedgerBroadcast:
    """The broadcast's checkpointable part: JSON state and a mirror tensor."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.mirror = {"m": torch.zeros(2)}

    def state_dict(self) -> dict[str, Any]:
        return {"sent": list(self.sent)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.mirror

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.sent = list(state["sent"])
        self.mirror = {k: v.clone() for k, v in tensors.items()}


class Private(PrivacyLevel):
    """A DP level for the tests: secret randomness, every round attempt accounted."""

    level = "test"
    private = True

    def __init__(self, cfg: RunConfig, ws: Any, sample_rate: float) -> None:
        super().__init__(cfg, ws, sample_rate)
        self.accounted = 0

    def add_attempts(self, count: int) -> None:
        self.accounted += count

    def observe_round(self, metrics: dict[str, float], server_round: int = 0) -> float | None:
        self.epsilon = 0.5 * server_round
        return self.epsilon


def aggregate_of(server_round: int) -> dict[str, torch.Tensor]:
    """What the strategy aggregates in ``server_round`` (the same in every run of a test)."""
    g = torch.Generator().manual_seed(1000 + server_round)
    return {k: torch.randn(*shape, generator=g) for k, shape in KEYS.items()}


def fake_workspace() -> SimpleNamespace:
    """What the callbacks read of a workspace: the task (its evaluation fields) and the
    adapter's rank in force."""
    return SimpleNamespace(task=TASKS.get("classification")(), adapter=SimpleNamespace(rank_in_force=lambda r: r))


def new_run(output: Path, private: bool = False, resume: Checkpoint | None = None, **settings: Any) -> RunContext:
    """A fresh run writing to ``output`` (as the driver builds it: a resumed DP run keeps its
    checkpoint's key; the checkpoint's state is put back by the checkpoint callback)."""
    cfg = replace(RunConfig(clients=8, cohort=4, rounds=5, output=str(output)), **settings)
    ws = fake_workspace()
    privacy = (Private if private else PrivacyLevel)(cfg, ws, cfg.cohort / cfg.clients)
    streams = privacy.choose_streams(resume.streams if resume is not None else None)
    state = ServerState(
        global_state={k: torch.zeros(*shape) for k, shape in KEYS.items()}, strategy=CountingStrategy(),
        pipeline=Pipeline([CountingStage()]), server_opt=build_server_optimizer("fedadam", lr=0.1),
        downlink=LedgerBroadcast(), privacy=privacy, streams=streams, average=IterateAverage(0.5))
    return RunContext(cfg, ws, state, plan={"clients": cfg.clients, "train_examples": 1234}, resume=resume)


def play_round(run: RunContext, callbacks: list[Callback], server_round: int, **result: Any) -> RoundContext:
    """One round as the driver plays it: ``before_round``, the (stand-in) aggregation stepping
    every piece of server state, then the callbacks' half of the round."""
    for callback in callbacks:
        callback.before_round(run, server_round)
    state = run.state
    state.strategy.rounds += 1
    state.pipeline.stages[0].seen += 4
    state.downlink.sent.append(server_round)
    state.downlink.mirror = {"m": state.downlink.mirror["m"] + server_round}
    state.advance(state.server_opt.step(state.global_state, aggregate_of(server_round)))
    fields: dict[str, Any] = dict(server_round=server_round, started=time.perf_counter(), rank=None,
                                  metrics={"train-loss": 0.1 * server_round, "bytes-up": 300.0}, clients_sampled=4,
                                  clients_failed=0, rejections=[], bytes_down=None, dense_up=100, dense_down=150)
    return complete_round(run, RoundResult(**{**fields, **result}), callbacks)
