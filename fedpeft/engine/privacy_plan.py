"""How a run's privacy level (``--dp none|user|sample``) plugs into the server loop.

One class per level, selected by name through :data:`PRIVACY_LEVELS`: it chooses where the
run's privacy randomness comes from (a secret key under DP, :mod:`fedpeft.privacy.randomness`),
calibrates what the privacy stages of the update pipeline are built from (user level: the
noise multiplier z; the level itself is the :class:`fedpeft.pipeline.PrivacyInputs` given to
them through :class:`fedpeft.pipeline.BuildEnv`), adds keys to every round's config (sample
level: the run's δ), decides whether the next round would pass the budget, turns round
metrics into the ε spent so far, and fills the privacy fields of ``results.json``. What it
reads back from the pipeline (user level: the accountant's ε) it reads through the
:class:`fedpeft.pipeline.PrivacyAccount` protocol, whichever stage implements it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedpeft.config import RunConfig
from fedpeft.errors import UsageError
from fedpeft.engine.workspace import Workspace
from fedpeft.privacy import default_delta, noise_multiplier_for
from fedpeft.privacy.client_accounting import planned_client_bound
from fedpeft.privacy.randomness import SEEDED_WARNING, RandomStreams, SecretStreams, SeededStreams
from fedpeft.registry import Registry
from fedpeft.pipeline import Pipeline, PrivacyAccount

PRIVACY_LEVELS: Registry[type[PrivacyLevel]] = Registry("privacy level")


class PrivacyLevel:
    """No privacy: every hook is a no-op."""

    level: str | None = None
    #: True for levels with a guarantee: their randomness is secret and their outputs are
    #: filtered (fedpeft.privacy.publication)
    private = False

    def __init__(self, cfg: RunConfig, ws: Workspace, sample_rate: float) -> None:
        self.cfg = cfg
        self.ws = ws
        self.sample_rate = sample_rate
        self.delta: float | None = None
        self.noise_multiplier: float | None = None
        self.epsilon: float | None = None
        self.streams: RandomStreams = SeededStreams(cfg.seed)

    def choose_streams(self, saved: RandomStreams | None = None) -> RandomStreams:
        """The run's cohort/noise streams: the public seed without DP or under the explicit
        ``--insecure-reproducible-noise``; else the checkpoint's secret key on resume, or a
        fresh one from the OS CSPRNG."""
        if not self.private or self.cfg.insecure_reproducible_noise:
            self.streams = SeededStreams(self.cfg.seed)
        elif isinstance(saved, SecretStreams):
            self.streams = saved
        else:
            self.streams = SecretStreams.fresh()
        return self.streams

    @property
    def warning(self) -> str | None:
        """Why this run's guarantee is weaker than its ε says, or None."""
        return SEEDED_WARNING if self.private and self.cfg.insecure_reproducible_noise else None

    def bind(self, pipeline: Pipeline) -> None:
        """Called once the run's pipeline is built (levels that read a stage keep it)."""

    def plan(self) -> dict[str, Any]:
        return {"dp_level": self.level}

    def randomness_fields(self) -> dict[str, Any]:
        if not self.private:
            return {}
        return {"randomness": self.streams.kind, "privacy_warning": self.warning}

    def round_config(self) -> dict[str, float]:
        return {}

    def stop_reason(self) -> str | None:
        """Why the next round must not run (budget), or None."""
        return None

    def observe_round(self, metrics: dict[str, float], server_round: int = 0) -> float | None:
        """ε spent so far, after round ``server_round`` with these metrics."""
        return None

    @property
    def fresh_attempts(self) -> bool:
        """True when every attempt at a round draws fresh noise and cohort (a secret key and a
        per-attempt nonce): then each attempt is accounted, and resumes keep the clients'
        accountants as they are. Not under --insecure-reproducible-noise, whose re-run round
        repeats its draws (and its results)."""
        return self.private and not self.cfg.insecure_reproducible_noise

    def add_attempts(self, count: int) -> None:
        """Account ``count`` round attempts that ran after the resumed checkpoint was written
        (its attempt ledger): each may have released a model (issue 24, finding 4)."""

    def final_fields(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "accountant": None, "dp_level": self.level}

    def state_dict(self) -> dict[str, Any]:
        """Server-side privacy bookkeeping for checkpoints (the accountant lives in the
        user-dp stage of the pipeline, client accountants in the client state directory)."""
        return {"epsilon": self.epsilon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epsilon = state.get("epsilon")


PRIVACY_LEVELS.register("none")(PrivacyLevel)


@PRIVACY_LEVELS.register("user")
class UserLevel(PrivacyLevel):
    """Central DP-FedAvg (SPEC §3.1): clip each client's whole update, noise the sum once
    per round, fixed denominator q·N, one Poisson-sampled Gaussian mechanism per round."""

    level = "user"
    private = True

    def __init__(self, cfg: RunConfig, ws: Workspace, sample_rate: float) -> None:
        super().__init__(cfg, ws, sample_rate)
        self.delta = cfg.delta if cfg.delta is not None else default_delta(cfg.clients)
        if cfg.noise_multiplier is not None:
            self.noise_multiplier = cfg.noise_multiplier
        else:
            assert cfg.epsilon is not None  # validated in config
            self.noise_multiplier = noise_multiplier_for(cfg.epsilon, self.delta, sample_rate,
                                                         cfg.rounds, cfg.accountant)
        self.stage: PrivacyAccount | None = None  # the stage that accounts, set by bind()

    def bind(self, pipeline: Pipeline) -> None:
        stage = pipeline.privacy_account
        if stage is None:
            raise ValueError("a user-level DP run needs a stage that accounts its privacy (user-dp) "
                             "in its pipeline")
        self.stage = stage

    def plan(self) -> dict[str, Any]:
        return {"dp_level": "user", "epsilon_target": self.cfg.epsilon, "delta": self.delta,
                "sample_rate": self.sample_rate, "rounds": self.cfg.rounds,
                "noise_multiplier": self.noise_multiplier,
                "update_noise_multiplier": getattr(self.stage, "update_noise_multiplier", None),
                "clip": self.cfg.clip, "adaptive_clip": self.cfg.adaptive_clip,
                "accountant": self.cfg.accountant, "expected_cohort": self.cfg.cohort,
                **self.randomness_fields()}

    def stop_reason(self) -> str | None:
        stage = self.stage
        if self.cfg.epsilon is not None and stage.exceeds_budget_next_round(self.cfg.epsilon):
            return (f"the next round would take ε past the target {self.cfg.epsilon} "
                    f"(spent {stage.epsilon():.4f}); stopping")
        return None

    def observe_round(self, metrics: dict[str, float], server_round: int = 0) -> float | None:
        self.epsilon = metrics.get("epsilon", self.epsilon)
        return self.epsilon

    def add_attempts(self, count: int) -> None:
        if count > 0:  # one Poisson-sampled Gaussian mechanism per attempt, at the run's (z, q)
            self.stage.account_attempts(count)
            self.epsilon = self.stage.epsilon()

    def final_fields(self) -> dict[str, Any]:
        eps = self.stage.epsilon() if self.stage is not None else None
        return {"epsilon": eps, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "accountant": self.cfg.accountant, "dp_level": "user", **self.randomness_fields()}


@PRIVACY_LEVELS.register("sample")
class SampleLevel(PrivacyLevel):
    """Per-client DP-SGD (SPEC §3.2). Clients account themselves across all their rounds (and
    refuse a round past ``--epsilon``); the run publishes the PLANNED per-client bound
    (:class:`fedpeft.privacy.client_accounting.PlannedBound`): after round t, the ε of the
    worst-case client of the run's partition had it trained in every attempt so far, and the
    smallest z any client trains with. Both are functions of the configuration, not of the
    cohort: the maximum ε / minimum z over the clients that returned (what was published before,
    issue 24 finding 7) revealed who was sampled and published ε 0.0 after a round in which no
    sampled client had data. The clients' own reports go to the diagnostics only
    (``reported_epsilon_max``)."""

    level = "sample"
    private = True

    def __init__(self, cfg: RunConfig, ws: Workspace, sample_rate: float) -> None:
        super().__init__(cfg, ws, sample_rate)
        mean_examples = max(1, ws.train_examples // cfg.clients)
        if cfg.max_client_examples:
            mean_examples = min(mean_examples, cfg.max_client_examples)
        self.delta = cfg.delta if cfg.delta is not None else default_delta(mean_examples)
        if not self.delta < 1 / mean_examples:
            raise UsageError(f"--delta {self.delta} is invalid for sample-level DP; allowed: a number "
                             f"in (0, 1/n) = (0, {1 / mean_examples:.3g}) with n = {mean_examples} "
                             "examples per client")
        sizes = ws.partitions(cfg.partition, cfg.clients, cfg.dirichlet_alpha, cfg.seed).sizes()
        if cfg.max_client_examples:
            sizes = np.minimum(sizes, cfg.max_client_examples)
        self.bound = planned_client_bound(sizes, cfg.batch_size, cfg.local_epochs, cfg.rounds,
                                          delta=self.delta, epsilon=cfg.epsilon,
                                          noise_multiplier=cfg.noise_multiplier, accountant=cfg.accountant)
        self.noise_multiplier = self.bound.noise_multiplier
        #: round attempts lost before a resume (the checkpoint's ledger): the worst-case client
        #: trained in each of them too
        self.lost_attempts = 0

    def plan(self) -> dict[str, Any]:
        return {"dp_level": "sample", "epsilon_target": self.cfg.epsilon, "delta": self.delta,
                "noise_multiplier": self.noise_multiplier,
                "epsilon_bound": self.bound.epsilon_after(self.cfg.rounds),
                "sample_clip": self.cfg.sample_clip, "accountant": self.cfg.accountant,
                "rounds": self.cfg.rounds, "client_sample_rate": self.sample_rate,
                **self.randomness_fields()}

    def round_config(self) -> dict[str, float]:
        return {"dp-delta": float(self.delta)}

    def observe_round(self, metrics: dict[str, float], server_round: int = 0) -> float | None:
        # the clients' own reports ("epsilon-max") are diagnostics, never the published figure
        self.epsilon = self.bound.epsilon_after(server_round + self.lost_attempts)
        return self.epsilon

    def add_attempts(self, count: int) -> None:
        self.lost_attempts += max(0, int(count))

    def state_dict(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "lost_attempts": self.lost_attempts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epsilon = state.get("epsilon")
        self.lost_attempts = int(state.get("lost_attempts", 0))

    def final_fields(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "accountant": self.cfg.accountant, "dp_level": "sample", **self.randomness_fields()}


def build_privacy(cfg: RunConfig, ws: Workspace, sample_rate: float) -> PrivacyLevel:
    return PRIVACY_LEVELS.get(cfg.dp or "none")(cfg, ws, sample_rate)
