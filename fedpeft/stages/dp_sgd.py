"""Sample-level DP (``--dp sample``, SPEC §3.2): every client trains with Opacus DP-SGD.

This stage transforms no update: its mechanism is the training procedure itself, the
``sample`` training mode registered here (:data:`fedpeft.engine.client.TRAINING_MODES`):
per-example clipping, Gaussian noise from the client's own secret, Poisson batches, and the
client's accountant, which persists across every round it trains in (loaded, checked against
the budget, stepped, saved). The stage sits in the pipeline so that the order printed before
round 1 shows where the privacy comes from, and so that the client picks its training mode from
the pipeline instead of from a privacy switch.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from fedpeft.engine.client import LocalTask, training_mode
from fedpeft.options import positive
from fedpeft.pipeline import STAGES, Stage
from fedpeft.training.local import LocalResult

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.strategy import FedPeftStrategy

#: the settings the ``sample`` training mode reads (besides the local round's)
SAMPLE_SETTINGS: tuple[str, ...] = ("batch_size", "local_epochs", "lr", "rounds", "sample_clip", "epsilon", "delta",
                                    "noise_multiplier", "accountant", "insecure_reproducible_noise")


@STAGES.register("dp-sgd")
class DpSgd(Stage):
    name = "dp-sgd"
    order = 0
    options = (positive("sample_clip"),)
    training = "sample"

    def describe(self) -> str:
        return "DP-SGD (per-example clip + noise, Opacus)"

    @classmethod
    def active(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> bool:
        return cfg.dp == "sample"

    @classmethod
    def refusal(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> str | None:
        if cfg.probe_rounds:  # the DP-SGD training mode has no head-only phase (fedpeft.training.probe)
            return (f"--probe-rounds {cfg.probe_rounds} is not implemented with --dp sample (DP-SGD trains "
                    "every adapter tensor); allowed: --probe-rounds 0, or --dp user / none")
        if cfg.precision != "fp32":  # fedpeft.training.precision: per-example norms in bfloat16
            return (f"--precision {cfg.precision} with --dp sample would compute per-example gradients and "
                    "their norms in bfloat16, so the clip bound --sample-clip would hold only to ~3 digits "
                    "(a weaker guarantee than asked); allowed: --precision fp32")
        return None


def _release_opacus() -> None:
    """Unwrap the cached model from Opacus if this process ran DP-SGD (back to plain autograd);
    nothing to do, and Opacus not imported, otherwise."""
    dp_sgd = sys.modules.get("fedpeft.training.dp_sgd")
    if dp_sgd is not None:
        dp_sgd.release_grad_sample_module()


@training_mode("sample", settings=SAMPLE_SETTINGS, release=_release_opacus)
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
