"""One client's round as a plain function (the ClientApp is a thin Flower wrapper on it).

The client builds the run's update pipeline from the run config (:mod:`fedpeft.pipeline`,
the same stages the server undoes) and:

1. trains in the mode its stages ask for, looked up in :data:`TRAINING_MODES` — no if-chain
   over names: ``none`` trains plainly (user-level DP clips and noises on the server,
   SPEC §3.1); ``sample`` (the ``dp-sgd`` stage) runs Opacus DP-SGD with the client's
   persistent accountant (SPEC §3.2, :mod:`fedpeft.training.dp_sgd`);
2. passes the adapter's upload through the client halves of the stages (drop client-local
   tensors, truncate to the client's rank, compress with error feedback).

Strategies that keep some tensors on the clients (FedSA-LoRA's ``B``: the ``client-local``
stage, :mod:`fedpeft.stages.client_local`) also get them loaded over the broadcast, saved
after training, and a personalized evaluation of the client's own model
(:mod:`fedpeft.training.personal_eval`); other strategies pay nothing for this.
"""

from __future__ import annotations

import functools
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.adapters import State
from fedpeft.adapters.base import StepHook
from fedpeft.config import RunConfig
from fedpeft.data.tokenized import shuffled_batches
from fedpeft.model.packing import collate_packed
from fedpeft.engine.local_params import (
    LOCAL_PARAMS_DIR,
    ClientLocal,
    LocalParamStore,
    local_only,
    shared_only,
)
from fedpeft.engine.workspace import Workspace
from fedpeft.pipeline import BuildEnv, ClientContext, Pipeline
from fedpeft.registry import Registry
from fedpeft.training.local import LocalResult, train_local
from fedpeft.training.precision import forward_precision
from fedpeft.training.probe import probing, train_head_only


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
    """Everything a training mode needs for one client round (built by :func:`train_client`)."""

    ws: Workspace
    cfg: RunConfig
    rnd: ClientRound
    rows: np.ndarray
    rng: np.random.Generator
    hook: StepHook | None
    state_dir: Path


@dataclass(frozen=True)
class ClientOutcome:
    #: what is sent, after the pipeline's client stages (a compressed upload is one payload)
    upload: State
    result: LocalResult
    #: Mode-specific reply metrics (sample-level DP: epsilon, noise-multiplier, dp-steps).
    metrics: dict[str, float] = field(default_factory=dict)


#: ``mode(task) -> (LocalResult, extra reply metrics)``, keyed by the pipeline's ``training``.
TrainingMode = Callable[[LocalTask], tuple[LocalResult, dict[str, float]]]
TRAINING_MODES: Registry[TrainingMode] = Registry("training mode")


def client_seed(cfg: RunConfig, rnd: ClientRound) -> list[int]:
    """Independent, reproducible stream per (run seed, round, client identity) for what the
    privacy guarantee does not rely on (data order, dropout, DyLoRA ranks). DP-SGD's noise and
    Poisson batches come from the client's own secret instead (``train_dp_sample``). The
    identity, not the partition index: nodes training on their own datasets are all partition 0."""
    return [cfg.seed, rnd.server_round, rnd.identity]


@TRAINING_MODES.register("none")
def train_plain(task: LocalTask) -> tuple[LocalResult, dict[str, float]]:
    """Non-private local AdamW (user-level DP protects the update on the server side)."""
    ws, cfg = task.ws, task.cfg
    dp_sgd = sys.modules.get("fedpeft.training.dp_sgd")
    if dp_sgd is not None:  # this worker ran --dp sample clients before: back to plain autograd
        dp_sgd.release_grad_sample_module()
    # packed: the same rows per batch, without the padding tokens (fedpeft.model.packing)
    make = collate_packed if ws.packed else ws.task.collate
    epochs = (shuffled_batches(ws.train, task.rows, cfg.batch_size, task.rng, ws.pad_id, make)
              for _ in range(cfg.local_epochs))
    forward = forward_precision(cfg.precision)  # fp32 unless --precision bf16 (opt-in autocast)
    if probing(task.rnd.server_round, cfg.probe_rounds):  # LP-FT: the head alone, at its own lr
        with train_head_only(ws.model):
            return train_local(ws.model, epochs, cfg.probe_lr, before_step=task.hook, forward_context=forward), {}
    return train_local(ws.model, epochs, cfg.lr, before_step=task.hook, forward_context=forward), {}


@TRAINING_MODES.register("sample")
def train_dp_sample(task: LocalTask) -> tuple[LocalResult, dict[str, float]]:
    """Opacus DP-SGD on the client's rows (SPEC §3.2), accounted in the client's own
    persistent accountant: load its history, refuse a round that would pass ``--epsilon``,
    train (every noisy step is recorded), save atomically, report ε at the run's δ."""
    from fedpeft.errors import UsageError
    from fedpeft.privacy.calibration import default_delta
    from fedpeft.privacy.client_accounting import ClientAccountantStore, client_noise_plan
    from fedpeft.privacy.randomness import client_secret_seeds
    from fedpeft.training.dp_sgd import PoissonSchedule, poisson_batches, train_local_dp

    ws, cfg, rnd, rows = task.ws, task.cfg, task.rnd, task.rows
    n = len(rows)
    # The run's δ comes from the server ("dp-delta"); standalone use falls back to the
    # configured δ or the default for this client's n.
    delta = (rnd.dp_delta if rnd.dp_delta is not None
             else cfg.delta if cfg.delta is not None else default_delta(n))
    plan = client_noise_plan(n, cfg.batch_size, cfg.local_epochs, cfg.rounds, delta=delta,
                             epsilon=cfg.epsilon, noise_multiplier=cfg.noise_multiplier,
                             accountant=cfg.accountant)
    schedule = PoissonSchedule(n, cfg.batch_size)
    policy = rnd.dp_policy
    if policy is not None:
        policy.check_noise(rnd.key, plan.noise_multiplier)
    store = ClientAccountantStore(policy.accountants if policy is not None
                                  else task.state_dir / "accountants", cfg.accountant)
    accountant = store.load(rnd.key)
    limit, limit_name = (policy.epsilon_limit(cfg.epsilon) if policy is not None
                         else (cfg.epsilon, "--epsilon"))
    if limit is not None:
        trial = accountant.copy()
        trial.step(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        if trial.epsilon(delta) > limit:
            raise UsageError(
                f"client {rnd.key}: this round would take its ε to {trial.epsilon(delta):.4f}, past "
                f"{limit_name} {limit} (its accountant at {store.path(rnd.key)} already holds "
                f"{accountant.steps} steps; stale client state from an earlier run?)")
    # the client's own secret (never sent anywhere), unless the run opted into seeded noise
    seeds = client_secret_seeds(2, task.rng if cfg.insecure_reproducible_noise else None)
    sampling = torch.Generator().manual_seed(seeds[0])
    noise = torch.Generator().manual_seed(seeds[1])
    epochs = (poisson_batches(ws.train, rows, plan.sample_rate, schedule.steps_per_epoch, sampling,
                              ws.pad_id, ws.task.collate)
              for _ in range(cfg.local_epochs))
    result = train_local_dp(ws.model, epochs, lr=cfg.lr, noise_multiplier=plan.noise_multiplier,
                            sample_clip=cfg.sample_clip, sample_rate=plan.sample_rate,
                            expected_batch_size=schedule.expected_batch_size,
                            accountant=accountant, generator=noise, before_step=task.hook)
    store.save(rnd.key, accountant)
    return result, {"epsilon": accountant.epsilon(delta), "noise-multiplier": plan.noise_multiplier,
                    "dp-steps": float(result.steps), "dp-delta": delta,
                    "dp-sample-rate": plan.sample_rate}


@functools.lru_cache(maxsize=8)
def client_pipeline(cfg: RunConfig) -> Pipeline:
    """The run's update pipeline as a client builds it (the server builds the same stages)."""
    from fedpeft.strategy import STRATEGIES

    return Pipeline.build(BuildEnv(cfg, STRATEGIES.get(cfg.strategy), "client"))


def client_local(pipeline: Pipeline) -> ClientLocal | None:
    """Which tensors stay on this client (the ``client-local`` stage's), or None."""
    stage = pipeline.find("client-local")
    return getattr(stage, "is_local", None)


def local_test_seed(cfg: RunConfig, rnd: ClientRound) -> list[int]:
    """Seed of a client's local test set: the run seed and the client, never the round
    (a client is evaluated on the same examples every time it is sampled)."""
    return [cfg.seed, 0x9E75, zlib.crc32(rnd.key.encode())]


def personalized_metrics(ws: Workspace, cfg: RunConfig, rnd: ClientRound, rows: np.ndarray,
                         broadcast: State, is_local: ClientLocal) -> dict[str, float]:
    """Accuracy of the client's personalized model — the broadcast's shared tensors (global
    ``A`` and head) with its own freshly trained local ones (``B``) — on its local test set.

    Leaves the model holding exactly that personalized state."""
    from fedpeft.training.personal_eval import LOCAL_TEST_SIZE, evaluate_rows, local_test_rows

    ws.adapter.load_state(ws.model, shared_only(broadcast, is_local))
    test_rows = local_test_rows(ws.train.labels[rows], ws.test.labels, LOCAL_TEST_SIZE,
                                np.random.default_rng(local_test_seed(cfg, rnd)))
    if len(test_rows) == 0:
        return {}
    ev = evaluate_rows(ws.model, ws.test, test_rows, ws.pad_id)
    # the baseline that makes the number readable under label skew: always predicting the
    # client's most frequent local label
    majority = float(np.bincount(np.asarray(ws.test.labels)[test_rows]).max() / len(test_rows))
    return {"personalized-accuracy": ev.accuracy, "personalized-examples": float(ev.examples),
            "personalized-majority": majority}


def _after_every_step(hook: StepHook | None, after: Callable[[], None]) -> StepHook:
    """``hook`` with ``after`` run after every optimizer step (following hook's own)."""
    def wrapped(step: int) -> Callable[[], None]:
        inner = hook(step) if hook is not None else None

        def both() -> None:
            if inner is not None:
                inner()
            after()
        return both
    return wrapped


def train_client(ws: Workspace, cfg: RunConfig, rnd: ClientRound, broadcast: State,
                 state_dir: Path) -> ClientOutcome:
    """Load the broadcast into the cached model, train this client's rows in the run's
    training mode, return its upload, loss and mode-specific metrics.

    With client-local tensors (FedSA-LoRA's ``B``) the client starts from its own saved ones
    (first time: the initial ones, which the server's global copy never leaves), saves them
    after training, uploads only the shared tensors and reports a personalized evaluation.
    """
    parts = ws.partitions(cfg.partition, rnd.num_partitions, cfg.dirichlet_alpha, cfg.seed)
    rows = parts.indices(rnd.client_id)
    if cfg.max_client_examples:
        rows = rows[: cfg.max_client_examples]
    pipeline = client_pipeline(cfg)
    is_local = client_local(pipeline)
    ctx = ClientContext(client_id=rnd.identity, key=rnd.key, server_round=rnd.server_round,
                        round_rank=rnd.round_rank, broadcast=broadcast, state_dir=Path(state_dir))
    ws.adapter.load_state(ws.model, broadcast)
    rank_cap = cfg.client_rank(rnd.identity)
    if len(rows) == 0:
        # no data: a valid zero update (the broadcast's own coordinates), so the server checks
        # and sums this reply like any other; nothing was trained, so nothing is accounted
        upload, stage_metrics = pipeline.on_client(ws.adapter.upload(ws.model, rnd.round_rank), ctx)
        return ClientOutcome(upload, LocalResult(mean_loss=float("nan"), steps=0, examples=0),
                             stage_metrics)
    store = LocalParamStore(Path(state_dir) / LOCAL_PARAMS_DIR) if is_local else None
    if store is not None:
        own = store.load(rnd.key, rnd.server_round)
        ws.adapter.load_state(ws.model, own if own is not None else local_only(ws.initial_state, is_local))
    mode = TRAINING_MODES.get(pipeline.training)
    rng = np.random.default_rng(client_seed(cfg, rnd))
    torch.manual_seed(int(rng.integers(2**31)))
    hook = ws.adapter.step_hook(ws.model, rng, rnd.round_rank)
    if rank_cap is not None:  # --client-ranks: this client is a rank-r_i LoRA
        hook = _after_every_step(hook, ws.adapter.limit_rank(ws.model, rank_cap))
    result, metrics = mode(LocalTask(ws, cfg, rnd, rows, rng, hook, Path(state_dir)))
    # before the personalized evaluation, which loads the broadcast's shared tensors back
    upload, stage_metrics = pipeline.on_client(ws.adapter.upload(ws.model, rnd.round_rank), ctx)
    if store is not None:
        store.save(rnd.key, local_only(ws.adapter.trainable_state(ws.model), is_local), rnd.server_round)
        metrics = {**metrics, **personalized_metrics(ws, cfg, rnd, rows, broadcast, is_local)}
    return ClientOutcome(upload,
                         LocalResult(mean_loss=result.mean_loss, steps=result.steps,
                                     examples=len(rows)),
                         {**metrics, **stage_metrics})
