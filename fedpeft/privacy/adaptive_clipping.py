"""Adaptive clipping by private quantile estimation (Andrew, Thakkar, McMahan, Ramaswamy,
"Differentially Private Learning with Adaptive Clipping", NeurIPS 2021; SPEC §3.1).

Each round, every sampled client also reports one bit ``b_i = 1[‖Δ_i‖ ≤ C]``. The server
releases a noised count and moves C geometrically toward the target quantile γ:

    b̃ = (Σ_i (b_i − ½) + N(0, σ_b²)) / (q·N) + ½          (fixed denominator, as for Δ)
    C ← C · exp(−η_C (b̃ − γ))                               (paper Alg. 2, geometric update)

Defaults: γ = 0.5, η_C = 0.2, σ_b = expected cohort / 20.

Centring the bit (b_i − ½ ∈ {−½, ½}, as TF-Privacy's ``QuantileAdaptiveClipSumQuery``
does) halves the count's sensitivity to ½. The round then releases the pair
(Σ clipped Δ_i + N(0, z_Δ² S² I), Σ (b_i − ½) + N(0, σ_b²)); scaling each part by its noise
std turns it into one Gaussian mechanism with unit noise and L2 sensitivity
√(z_Δ⁻² + (2σ_b)⁻²). So the pair is exactly as private as a single Gaussian mechanism with
noise multiplier z where (paper Thm. 1)

    z⁻² = z_Δ⁻² + (2σ_b)⁻²,   i.e.   z_Δ = (z⁻² − (2σ_b)⁻²)^(−½).

The accountant is charged with z (what the calibration produced for the budget); the update
itself gets the slightly larger z_Δ. This needs z < 2σ_b.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedpeft.errors import UsageError


@dataclass(frozen=True)
class AdaptiveClipConfig:
    """Options of adaptive clipping (SPEC §3.1 defaults)."""

    target_quantile: float = 0.5
    clip_lr: float = 0.2
    #: σ_b, std of the noise on the clipped-count; None → expected cohort / 20.
    count_noise_std: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise UsageError(f"target quantile {self.target_quantile!r} is invalid; allowed: (0, 1)")
        if not (math.isfinite(self.clip_lr) and self.clip_lr > 0):
            raise UsageError(f"clip learning rate {self.clip_lr!r} is invalid; allowed: a number > 0")
        if self.count_noise_std is not None and not self.count_noise_std > 0:
            raise UsageError(f"count noise std {self.count_noise_std!r} is invalid; allowed: > 0")

    def count_std(self, expected_cohort: float) -> float:
        """σ_b in force for this expected cohort."""
        return self.count_noise_std if self.count_noise_std is not None else expected_cohort / 20.0


def update_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−½): the update's noise multiplier that, together with the
    count noised with σ_b, spends exactly what one Gaussian mechanism with z spends
    (Andrew et al. 2021, Thm. 1). UsageError when z ≥ 2σ_b (the count alone would then
    spend the whole budget)."""
    z, s = float(noise_multiplier), float(count_std)
    if not (z > 0 and s > 0):
        raise ValueError(f"noise multiplier {z} and count std {s} must be > 0")
    if z >= 2.0 * s:
        raise UsageError(
            f"adaptive clipping: noise multiplier {z:.4g} needs a clipped-count noise std above "
            f"z/2 = {z / 2:.4g}, but it is {s:.4g} (expected cohort / 20 by default); allowed: a "
            "larger cohort, a larger count noise std, or fixed clipping")
    return (z ** -2 - (2.0 * s) ** -2) ** -0.5


def noised_quantile(norms: Sequence[float], clip: float, count_std: float,
                    expected_cohort: float, generator: torch.Generator) -> float:
    """b̃: the privately estimated fraction of clients whose update norm is ≤ ``clip``
    (centred bits, fixed denominator; see the module docstring)."""
    centred = sum((1.0 if n <= clip else 0.0) - 0.5 for n in norms)
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * float(count_std)
    return (centred + noise) / float(expected_cohort) + 0.5


def next_clip(clip: float, quantile_estimate: float, target_quantile: float, clip_lr: float) -> float:
    """Geometric update ``C · exp(−η_C (b̃ − γ))``: shrinks C when more than γ of the
    clients were already below it, grows it otherwise."""
    return float(clip) * math.exp(-float(clip_lr) * (float(quantile_estimate) - float(target_quantile)))


__all__ = ["AdaptiveClipConfig", "next_clip", "noised_quantile", "update_noise_multiplier"]
