"""User-level DP-FedAvg as a server stage (SPEC §3.1), composable with any strategy.

The stage replaces the cohort's updates by the Gaussian mechanism's release

    Δ̄ = (Σ_i clip_S(upload_i − global) + N(0, z² S² I)) / (q·N),

one sampled Gaussian mechanism per round for the accountant, handed on as the round's single
pseudo-update ``global + Δ̄`` with weight 1: for FedAvg that yields ``global + Δ̄``; a server
optimiser then steps on Δ̄. Whatever the strategy and the server optimiser do with it is
post-processing of a DP release and costs no privacy, as long as they never see the
individual uploads: strategies with ``needs_individual_updates`` (LoRA-FAIR, FLoRA) are
refused (:attr:`combines_updates`, checked by :func:`fedpeft.pipeline.refusals`).

Clients are weighted uniformly (weight 1, not their example count): example counts are
unbounded, data-dependent weights that would change the sensitivity. The noise covers the
whole honest upload layout of the round, also in a round in which nobody was sampled or
replied: the accounted mechanism is "Poisson-sample, then release the noised sum", and it
ran; an un-noised "nothing happened" would reveal the empty cohort.

Metrics that are NOT covered by the guarantee ("train-loss", "num-examples",
"fraction-clipped", "clients-replied", upload sizes) are computed from the raw replies; the
server's publication policy (:mod:`fedpeft.privacy.publication`) keeps them out of the
published results unless the user asks for the separate diagnostics file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fedpeft.options import Option, positive
from fedpeft.pipeline import STAGES, BuildEnv, Metrics, ServerContext, Stage
from fedpeft.privacy.accounting import Accountant, make_accountant
from fedpeft.privacy.adaptive_clipping import (
    AdaptiveClipConfig,
    next_clip,
    noised_quantile,
    update_noise_multiplier,
)
from fedpeft.privacy.calibration import would_exceed_budget
from fedpeft.privacy.mechanisms import clip_by_l2, dp_fedavg_aggregate
from fedpeft.privacy.randomness import SERVER_NOISE, RandomStreams, SecretStreams
from fedpeft.strategy import ClientUpdate
from fedpeft.training.probe import head_only, probing
from fedpeft.updates import apply_update, client_delta

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.strategy import FedPeftStrategy


@STAGES.register("user-dp")
class UserLevelDP(Stage):
    """Clip each client's update to S, noise the sum with ``N(0, z_Δ² S² I)``, divide by the
    expected cohort and account one Poisson-sampled Gaussian mechanism per round.

    Args:
        noise_multiplier: z charged to the accountant per round, e.g. from
            :func:`fedpeft.privacy.calibration.noise_multiplier_for`. With adaptive clipping
            the update gets ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) ≥ z`` so that update and count
            together spend exactly z (Andrew et al. 2021, Thm. 1).
        clip: S, the clip norm (the initial one under adaptive clipping).
        expected_cohort: ``q·N``, the fixed denominator.
        sample_rate: q, the Poisson client-sampling rate.
        accountant: where rounds are composed (may carry history from a checkpoint).
        delta: δ at which ε is reported.
        streams: where the round's noise comes from (:mod:`fedpeft.privacy.randomness`):
            round t's noise is the ``server-noise`` stream of round t. Secret streams mix in a
            nonce per attempt, so a round re-run after a resume draws fresh noise (and is
            accounted again); it never re-releases the same noise on other inputs. Default: a
            fresh secret key from the OS CSPRNG — never a public seed, or anyone holding it
            could subtract the noise.
        adaptive: adaptive clipping options, or None for fixed clipping.
        probe_rounds: in rounds 1..probe_rounds (LP-FT) only the head's coordinates are
            clipped, noised and released; the clients' values of the others are ignored.
    """

    name = "user-dp"
    order = 40
    options = (positive("clip"), Option("target_quantile", lambda v: 0 < v < 1, "a number in (0, 1)"),
               positive("clip_lr"))
    combines_updates = True
    keeps_updates_instead = "--dp sample"
    sides = ("server",)

    def __init__(self, noise_multiplier: float, clip: float, expected_cohort: float,
                 sample_rate: float, accountant: Accountant, delta: float,
                 streams: RandomStreams | None = None,
                 adaptive: AdaptiveClipConfig | None = None, probe_rounds: int = 0) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"noise multiplier {noise_multiplier} must be finite and > 0")
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip norm {clip} must be finite and > 0")
        if not expected_cohort > 0:
            raise ValueError(f"expected cohort {expected_cohort} must be > 0")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate {sample_rate} outside (0, 1]")
        if not 0 < delta < 1:
            raise ValueError(f"delta {delta} outside (0, 1)")
        self.noise_multiplier = float(noise_multiplier)
        self.clip = float(clip)
        self.expected_cohort = float(expected_cohort)
        self.sample_rate = float(sample_rate)
        self.accountant = accountant
        self.delta = float(delta)
        self.streams = streams if streams is not None else SecretStreams.fresh()
        self.adaptive = adaptive
        #: LP-FT (:mod:`fedpeft.training.probe`): rounds 1..probe_rounds release the head alone
        self.probe_rounds = int(probe_rounds)
        self.count_std = adaptive.count_std(self.expected_cohort) if adaptive else 0.0
        #: z_Δ, the multiplier of the noise actually added to the update sum.
        self.update_noise_multiplier = (
            update_noise_multiplier(self.noise_multiplier, self.count_std) if adaptive
            else self.noise_multiplier)

    @classmethod
    def active(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> bool:
        return cfg.dp == "user"

    @classmethod
    def create(cls, env: BuildEnv) -> UserLevelDP:
        """From the run's privacy inputs (:class:`fedpeft.pipeline.PrivacyInputs`, the user
        privacy level of ``fedpeft.engine.privacy_plan``): its calibrated z, δ, q and secret
        streams."""
        cfg, privacy = env.cfg, env.privacy
        if privacy is None:
            raise ValueError("the user-dp stage is built on the server, from the run's privacy level")
        adaptive = (AdaptiveClipConfig(target_quantile=cfg.target_quantile, clip_lr=cfg.clip_lr)
                    if cfg.adaptive_clip else None)
        return cls(privacy.noise_multiplier, cfg.clip, cfg.cohort, privacy.sample_rate,
                   make_accountant(cfg.accountant), privacy.delta, streams=privacy.streams,
                   adaptive=adaptive, probe_rounds=cfg.probe_rounds)

    def describe(self) -> str:
        return (f"clip to S={self.clip:.4g}{' (adaptive)' if self.adaptive else ''} + Gaussian noise "
                f"z={self.update_noise_multiplier:.4g} / qN={self.expected_cohort:g}")

    def on_server(self, updates: list[ClientUpdate], ctx: ServerContext) -> tuple[list[ClientUpdate], Metrics]:
        """Privatize the round (see the module docstring); the accountant is stepped and the
        noise added on EVERY round, also when no client was sampled or none replied."""
        global_state = ctx.global_state
        clip = self.clip
        clipped, norms = [], []
        released = head_only if probing(ctx.server_round, self.probe_rounds) else dict
        for u in updates:
            c, n = clip_by_l2(released(client_delta(global_state, u.state)), clip)
            clipped.append(c)
            norms.append(n)
        generator = self.streams.torch(SERVER_NOISE, ctx.server_round)
        template = {k: torch.zeros(s, dtype=torch.float64) for k, s in released(ctx.upload_layout).items()}
        mean_update = dp_fedavg_aggregate(clipped, self.update_noise_multiplier, clip,
                                          self.expected_cohort, generator, template=template)
        pseudo = ClientUpdate(node_id=-1, client_id=-1, num_examples=1,
                              state=apply_update(global_state, mean_update),
                              train_loss=float("nan"), bytes_up=0)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        if self.adaptive is not None:
            estimate = noised_quantile(norms, clip, self.count_std, self.expected_cohort, generator)
            self.clip = next_clip(clip, estimate, self.adaptive.target_quantile, self.adaptive.clip_lr)
        metrics = {"epsilon": self.epsilon(), "noise-multiplier": self.noise_multiplier, "clip-norm": clip}
        if norms:
            metrics["fraction-clipped"] = sum(n > clip for n in norms) / len(norms)
        return [pseudo], metrics

    # -- privacy state -----------------------------------------------------------------
    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta`."""
        return self.accountant.epsilon(self.delta)

    def exceeds_budget_next_round(self, epsilon: float) -> bool:
        """True when one more round would take ε past ``epsilon`` (SPEC §3.1: stop before)."""
        return would_exceed_budget(self.accountant, self.noise_multiplier, self.sample_rate,
                                   epsilon, self.delta)

    def account_attempts(self, count: int) -> None:
        """Charge ``count`` round attempts that ran after the state was saved (a resume): one
        Poisson-sampled Gaussian mechanism each, at the run's (z, q)."""
        self.accountant.step(self.noise_multiplier, self.sample_rate, count)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable checkpoint of the privacy state."""
        return {"accountant": self.accountant.state_dict(), "clip": self.clip}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.accountant.load_state_dict(dict(state["accountant"]))
        self.clip = float(state["clip"])
