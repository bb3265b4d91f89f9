"""One client's round as a plain function (the ClientApp is a thin Flower wrapper on it).

The client builds the run's update pipeline (:mod:`fedpeft.pipeline`: the client halves of
the stages the server undoes, as the server named them) and:

1. loads the broadcast, lets the stages prepare the model (:meth:`Stage.before_training`,
   e.g. FedSA-LoRA's own ``B``, :mod:`fedpeft.stages.client_local`);
2. trains in the mode its stages ask for, looked up in :data:`TRAINING_MODES` — no if-chain
   over names: ``none`` (here) trains plainly (user-level DP clips and noises on the server,
   SPEC §3.1); a stage registers its own mode (``sample``: DP-SGD,
   :mod:`fedpeft.stages.dp_sgd`); the stages' :meth:`Stage.after_step` run after every
   optimizer step (the rank cap, :mod:`fedpeft.stages.rank_cap`);
3. passes the adapter's upload through the client halves of the stages (drop client-local
   tensors, truncate to the client's rank, compress with error feedback), then lets them keep
   state and report (:meth:`Stage.after_training`).

What it reads of the run config is declared in :data:`ROUND_SETTINGS` and each training
mode's :attr:`TrainingMode.settings` (:mod:`fedpeft.engine.client_settings`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.adapters import State
from fedpeft.adapters.base import StepHook
from fedpeft.config import ClientConfig, RunConfig
from fedpeft.data.tokenized import shuffled_batches
from fedpeft.engine.workspace import Workspace
from fedpeft.model.packing import collate_packed
from fedpeft.pipeline import BuildEnv, ClientContext, Pipeline
from fedpeft.registry import Registry
from fedpeft.training.local import LocalResult, train_local
from fedpeft.training.precision import forward_precision
from fedpeft.training.probe import probing, train_head_only

#: the settings :func:`train_client` reads whatever the mode (which rows, whose seed, which
#: strategy's stages)
ROUND_SETTINGS: tuple[str, ...] = ("partition", "dirichlet_alpha", "seed", "max_client_examples", "strategy")


@dataclass(frozen=True)
class ClientRound:
    client_id: int
    num_partitions: int
    server_round: int
    round_rank: int | None
    #: Identity of this client's on-disk state (accountant file); default ``client_id``.
    #: A node training on its own dataset is partition 0 of 1, but keeps its node identity.
    state_key: str | None = None
    #: The run's δ for sample-level DP, sent by the server in the round config ("dp-delta").
    dp_delta: float | None = None
    #: The node's own DP policy (:mod:`fedpeft.federation.node_policy`): its accountant
    #: location, z floor and ε budget. None: the run's config is the policy (simulation).
    dp_policy: Any = None

    @property
    def key(self) -> str:
        return self.state_key if self.state_key is not None else str(self.client_id)

    @property
    def identity(self) -> int:
        """The client id the server knows this client by (its node's ``partition-id``)."""
        return int(self.key) if self.key.isdigit() else self.client_id


@dataclass(frozen=True)
class LocalTask:
    """Everything a training mode, and a stage's client hooks, see of one client round (built
    by :func:`train_client`)."""

    ws: Workspace
    cfg: RunConfig
    rnd: ClientRound
    #: the client's training rows
    rows: np.ndarray
    #: the round's public stream (:func:`client_seed`)
    rng: np.random.Generator
    #: before every optimizer step: the adapter's hook with the stages' ``after_step`` composed
    #: in (None in what a stage's ``before_training``/``after_step`` is given)
    hook: StepHook | None
    state_dir: Path


@dataclass(frozen=True)
class ClientOutcome:
    #: what is sent, after the pipeline's client stages (a compressed upload is one payload)
    upload: State
    result: LocalResult
    #: Mode-specific reply metrics (sample-level DP: epsilon, noise-multiplier, dp-steps).
    metrics: dict[str, float] = field(default_factory=dict)


Train = Callable[["LocalTask"], tuple[LocalResult, dict[str, float]]]


@dataclass(frozen=True)
class TrainingMode:
    """A client training procedure, keyed in :data:`TRAINING_MODES` by the name a pipeline's
    ``training`` asks for, with the settings it reads (sent to clients that train in it)."""

    train: Train
    settings: tuple[str, ...]
    #: undoes what this mode leaves on the process' cached model (Opacus' per-sample hooks),
    #: called before another mode trains in the same process
    release: Callable[[], None] = lambda: None

    def __call__(self, task: LocalTask) -> tuple[LocalResult, dict[str, float]]:
        for name in TRAINING_MODES.names():  # a worker may have run other modes' clients before
            other = TRAINING_MODES.get(name)
            if other is not self and isinstance(other, TrainingMode):
                other.release()
        return self.train(task)


#: ``mode(task) -> (LocalResult, extra reply metrics)``, keyed by the pipeline's ``training``;
#: stages register the modes they ask for (a plug-in package, as the stages are)
TRAINING_MODES: Registry[TrainingMode] = Registry("training mode", plugins="fedpeft.stages")


def training_mode(name: str, settings: tuple[str, ...],
                  release: Callable[[], None] = lambda: None) -> Callable[[Train], Train]:
    """Register the decorated function as training mode ``name`` reading ``settings``."""
    def register(train: Train) -> Train:
        TRAINING_MODES.register(name)(TrainingMode(train, settings, release))
        return train
    return register


def client_seed(cfg: RunConfig, rnd: ClientRound) -> list[int]:
    """Independent, reproducible stream per (run seed, round, client identity) for what the
    privacy guarantee does not rely on (data order, dropout, DyLoRA ranks). DP-SGD's noise and
    Poisson batches come from the client's own secret instead (:mod:`fedpeft.stages.dp_sgd`). The
    identity, not the partition index: nodes training on their own datasets are all partition 0."""
    return [cfg.seed, rnd.server_round, rnd.identity]


@training_mode("none", settings=("batch_size", "local_epochs", "lr", "probe_rounds", "probe_lr", "precision"))
def train_plain(task: LocalTask) -> tuple[LocalResult, dict[str, float]]:
    """Non-private local AdamW (user-level DP protects the update on the server side)."""
    ws, cfg = task.ws, task.cfg
    # packed: the same rows per batch, without the padding tokens (fedpeft.model.packing)
    make = collate_packed if ws.packed else ws.task.collate
    epochs = (shuffled_batches(ws.train, task.rows, cfg.batch_size, task.rng, ws.pad_id, make)
              for _ in range(cfg.local_epochs))
    forward = forward_precision(cfg.precision)  # fp32 unless --precision bf16 (opt-in autocast)
    if probing(task.rnd.server_round, cfg.probe_rounds):  # LP-FT: the head alone, at its own lr
        with train_head_only(ws.model):
            return train_local(ws.model, epochs, cfg.probe_lr, before_step=task.hook, forward_context=forward), {}
    return train_local(ws.model, epochs, cfg.lr, before_step=task.hook, forward_context=forward), {}


@functools.lru_cache(maxsize=8)
def client_pipeline(cfg: RunConfig) -> Pipeline:
    """The run's update pipeline as a client builds it: the client stages the server named in
    its message (:class:`fedpeft.config.ClientConfig`), else — a caller holding the whole
    config — those active for ``cfg``, as the server builds them."""
    from fedpeft.strategy import STRATEGIES

    stages = cfg.client_stages if isinstance(cfg, ClientConfig) else None
    return Pipeline.build(BuildEnv(cfg, STRATEGIES.get(cfg.strategy), "client", stages=stages))


def train_client(ws: Workspace, cfg: RunConfig, rnd: ClientRound, broadcast: State,
                 state_dir: Path) -> ClientOutcome:
    """Load the broadcast into the cached model, train this client's rows in the run's
    training mode with its stages around it (see the module docstring), return its upload,
    loss and the mode's and stages' metrics."""
    parts = ws.partitions(cfg.partition, rnd.num_partitions, cfg.dirichlet_alpha, cfg.seed)
    rows = parts.indices(rnd.client_id)
    if cfg.max_client_examples:
        rows = rows[: cfg.max_client_examples]
    pipeline = client_pipeline(cfg)
    ctx = ClientContext(client_id=rnd.identity, key=rnd.key, server_round=rnd.server_round,
                        round_rank=rnd.round_rank, broadcast=broadcast, state_dir=Path(state_dir))
    ws.adapter.load_state(ws.model, broadcast)
    if len(rows) == 0:
        # no data: a valid zero update (the broadcast's own coordinates), so the server checks
        # and sums this reply like any other; nothing was trained, so nothing is accounted
        upload, stage_metrics = pipeline.on_client(ws.adapter.upload(ws.model, rnd.round_rank), ctx)
        return ClientOutcome(upload, LocalResult(mean_loss=float("nan"), steps=0, examples=0),
                             stage_metrics)
    rng = np.random.default_rng(client_seed(cfg, rnd))
    task = LocalTask(ws, cfg, rnd, rows, rng, None, Path(state_dir))
    pipeline.before_training(task, ctx)
    mode = TRAINING_MODES.get(pipeline.training)
    torch.manual_seed(int(rng.integers(2**31)))
    hook = pipeline.step_hook(ws.adapter.step_hook(ws.model, rng, rnd.round_rank), task, ctx)
    task = dataclasses.replace(task, hook=hook)
    result, metrics = mode(task)
    upload, stage_metrics = pipeline.on_client(ws.adapter.upload(ws.model, rnd.round_rank), ctx)
    metrics = {**metrics, **pipeline.after_training(task, ctx)}
    return ClientOutcome(upload,
                         LocalResult(mean_loss=result.mean_loss, steps=result.steps,
                                     examples=len(rows)),
                         {**metrics, **stage_metrics})
