"""User-level DP-FedAvg as a wrapper around any fedpeft strategy (SPEC §3.1).

Like Flower's ``DifferentialPrivacyServerSideFixedClipping`` this is composition, not a
strategy of its own (so it is not in ``STRATEGIES``): it forwards ``configure_train`` to the
wrapped strategy (which Poisson-samples the cohort), and replaces aggregation by the
Gaussian mechanism

    Δ̄ = (Σ_i clip_S(upload_i − global) + N(0, z² S² I)) / (q·N),

one sampled Gaussian mechanism per round for the accountant. The privatized mean update
Δ̄ is then handed to the wrapped strategy as the round's single (pseudo-)client update,
``global_slice + Δ̄`` with weight 1: for FedAvg that yields ``merge(global, global + Δ̄)``;
a server optimizer would apply its step to Δ̄. Whatever the wrapped strategy does with it
is post-processing of a DP release, so it costs no privacy — as long as it never sees
the individual uploads, which is why strategies with ``needs_individual_updates``
(LoRA-FAIR, SPEC §2.2) are refused.

Clients are weighted uniformly (weight 1, not their example count): example counts are
unbounded, data-dependent weights that would change the sensitivity.

Metrics that are NOT covered by the guarantee ("train-loss", "num-examples",
"fraction-clipped", "clients-replied", upload sizes) are computed from the raw replies, as in
the non-private base, and returned beside the covered ones; the server's publication policy
(:mod:`fedpeft.privacy.publication`) keeps them out of results.json, rounds.csv and the logs
unless the user asks for the separate diagnostics file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.adapters.base import Adapter, State
from fedpeft.errors import UsageError
from fedpeft.federation.local_params import client_local_of, shared_only
from fedpeft.federation.records import to_record
from fedpeft.privacy.accounting import Accountant
from fedpeft.privacy.adaptive_clipping import (
    AdaptiveClipConfig,
    next_clip,
    noised_quantile,
    update_noise_multiplier,
)
from fedpeft.privacy.calibration import would_exceed_budget
from fedpeft.privacy.mechanisms import clip_by_l2, dp_fedavg_aggregate
from fedpeft.privacy.randomness import SERVER_NOISE, RandomStreams, SecretStreams
from fedpeft.updates import apply_update, client_delta, prefix_slice
from fedpeft.strategy import ClientUpdate, FedPeftStrategy

#: Shapes of what clients upload in a round: key -> tensor shape.
Layout = dict[str, tuple[int, ...]]


def layout_of(state: Mapping[str, torch.Tensor]) -> Layout:
    return {k: tuple(int(s) for s in v.shape) for k, v in state.items()}


class UserLevelDP(Strategy):
    """Clip each client's update to S, noise the sum with ``N(0, z_Δ² S² I)``, divide by the
    expected cohort and account one Poisson-sampled Gaussian mechanism per round.

    Args:
        inner: the strategy to privatize (its sampler must Poisson-sample at ``sample_rate``).
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
            round t's noise is the ``server-noise`` stream of round t, so a resumed run with
            the same streams draws the same noise. Default: a fresh secret key from the OS
            CSPRNG — never a public seed, or anyone holding it could subtract the noise.
        adaptive: adaptive clipping options, or None for fixed clipping.
        upload_layout: ``round_rank -> {key: shape}`` of what clients upload (without the
            tensors a strategy keeps on the clients, e.g. FedSA-LoRA's ``B``), used to noise
            rounds in which nobody replied. Without it the layout of an earlier round with
            the same rank is used, else the broadcast's layout (logged).
    """

    def __init__(self, inner: FedPeftStrategy, noise_multiplier: float, clip: float,
                 expected_cohort: float, sample_rate: float, accountant: Accountant,
                 delta: float, streams: RandomStreams | None = None,
                 adaptive: AdaptiveClipConfig | None = None,
                 upload_layout: Callable[[int | None], Layout] | None = None) -> None:
        super().__init__()
        if getattr(inner, "needs_individual_updates", False):
            raise UsageError(
                f"strategy {getattr(inner, 'name', type(inner).__name__)!r} needs every client's "
                "individual update and cannot run under user-level DP (the server only sees a "
                "noised sum); allowed: --dp sample, or a strategy such as fedavg")
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
        self.inner = inner
        self.noise_multiplier = float(noise_multiplier)
        self.clip = float(clip)
        self.expected_cohort = float(expected_cohort)
        self.sample_rate = float(sample_rate)
        self.accountant = accountant
        self.delta = float(delta)
        self.streams = streams if streams is not None else SecretStreams.fresh()
        self.adaptive = adaptive
        self.count_std = adaptive.count_std(self.expected_cohort) if adaptive else 0.0
        #: z_Δ, the multiplier of the noise actually added to the update sum.
        self.update_noise_multiplier = (
            update_noise_multiplier(self.noise_multiplier, self.count_std) if adaptive
            else self.noise_multiplier)
        self._upload_layout = upload_layout
        self._layouts: dict[int | None, Layout] = {}

    # -- forwarded ---------------------------------------------------------------------
    @property
    def adapter(self) -> Adapter:
        return self.inner.adapter

    @property
    def name(self) -> str:
        return f"{self.inner.name}+user-dp"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
        log(INFO, "\t├── user-level DP: z=%.4f (update z_Δ=%.4f), S=%.4g%s, expected cohort %.4g, "
            "q=%.4g, accountant %s, δ=%.3g", self.noise_multiplier, self.update_noise_multiplier,
            self.clip, " adaptive" if self.adaptive else "", self.expected_cohort, self.sample_rate,
            self.accountant.name, self.delta)

    # -- the mechanism -----------------------------------------------------------------
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Privatize the round (see the class docstring).

        The accountant is stepped and the noise added on EVERY round, also when no client
        was sampled or none replied: the accounted mechanism is "Poisson-sample, then release
        the noised sum", and it ran; an un-noised "nothing happened" output would reveal the
        empty cohort and is not the mechanism the accountant analysed.
        """
        replies = list(replies)
        # Read, not written: the inner strategy set these in configure_train.
        global_state: State = self.inner.global_state
        round_rank: int | None = self.inner.round_rank
        updates = self.inner.accept(replies)

        deltas = [client_delta(global_state, u.state) for u in updates]
        layout = self._layout(round_rank, global_state, deltas)
        clip = self.clip
        clipped: list[State] = []
        norms: list[float] = []
        for d in deltas:
            c, n = clip_by_l2(d, clip)
            clipped.append(c)
            norms.append(n)

        generator = self._round_generator(server_round)
        template = {k: torch.zeros(s, dtype=torch.float64) for k, s in layout.items()}
        mean_update = dp_fedavg_aggregate(clipped, self.update_noise_multiplier, clip,
                                          self.expected_cohort, generator, template=template)
        pseudo = ClientUpdate(node_id=-1, client_id=-1, num_examples=1,
                              state=apply_update(global_state, mean_update),
                              train_loss=float("nan"), bytes_up=0)
        # post-processing of the release: aggregation and the server optimiser cost no ε
        new_global = self.inner.server_step(global_state, self.inner.aggregate(global_state, [pseudo]))
        self.accountant.step(self.noise_multiplier, self.sample_rate)

        if self.adaptive is not None:
            estimate = noised_quantile(norms, clip, self.count_std, self.expected_cohort, generator)
            self.clip = next_clip(clip, estimate, self.adaptive.target_quantile, self.adaptive.clip_lr)

        metrics = self.inner.round_metrics(replies, updates)
        metrics["epsilon"] = self.epsilon()
        metrics["noise-multiplier"] = self.noise_multiplier
        metrics["clip-norm"] = clip
        if norms:
            metrics["fraction-clipped"] = sum(n > clip for n in norms) / len(norms)
        return to_record(new_global), MetricRecord(metrics)

    # -- privacy state -----------------------------------------------------------------
    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta`."""
        return self.accountant.epsilon(self.delta)

    def exceeds_budget_next_round(self, epsilon: float) -> bool:
        """True when running one more round would take ε past ``epsilon`` (SPEC §3.1:
        stop before such a round)."""
        return would_exceed_budget(self.accountant, self.noise_multiplier, self.sample_rate,
                                   epsilon, self.delta)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable checkpoint of the privacy state."""
        return {"accountant": self.accountant.state_dict(), "clip": self.clip}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accountant.load_state_dict(dict(state["accountant"]))
        self.clip = float(state["clip"])

    # -- helpers -----------------------------------------------------------------------
    def _round_generator(self, server_round: int) -> torch.Generator:
        return self.streams.torch(SERVER_NOISE, server_round)

    def _layout(self, round_rank: int | None, global_state: State, deltas: list[State]) -> Layout:
        """The coordinates that are clipped and noised this round; every reply must match."""
        if self._upload_layout is not None:
            expected = {k: tuple(s) for k, s in self._upload_layout(round_rank).items()}
        elif deltas:
            expected = layout_of(deltas[0])
        elif round_rank in self._layouts:
            expected = self._layouts[round_rank]
        else:
            sent = self.inner.adapter.broadcast(global_state, round_rank)
            # not logged: that nobody replied is itself not covered by the guarantee
            expected = layout_of(shared_only(sent, client_local_of(self.inner)))
        for d in deltas:
            if layout_of(d) != expected:
                raise ValueError("a client's upload does not match this round's upload layout "
                                 f"(keys/shapes {sorted(layout_of(d).items())[:3]}...)")
        self._layouts[round_rank] = expected
        return expected


__all__ = ["Layout", "UserLevelDP", "apply_update", "client_delta", "layout_of", "prefix_slice"]
