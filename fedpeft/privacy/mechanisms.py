"""The Gaussian mechanism of user-level DP-FedAvg as pure functions on tensor states
(SPEC §3.1; McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models", Algorithm 1 with the fixed-denominator estimator).

A client's update is a ``dict[str, Tensor]``; clipping treats ALL its tensors as one
vector, so the sensitivity of the sum to one client is exactly ``S``. Sums are taken in
float64.

Noise comes from ``torch.Generator`` (a seeded PRNG) and floating-point Gaussian
sampling: right for a reproducible simulation, but not hardened against
floating-point attacks (Mironov 2012) — a production deployment needs a secure sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

State = dict[str, torch.Tensor]


def l2_norm(update: State) -> float:
    """L2 norm of the concatenation of every tensor of ``update`` (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for t in update.values():
        total += t.detach().to(torch.float64).pow(2).sum()
    return float(total.sqrt())


def _rounding_margin(update: State) -> float:
    """Relative margin that keeps the clipped norm ≤ S after casting back to the tensors'
    dtype (each element's relative rounding error is at most eps/2)."""
    eps = [torch.finfo(t.dtype).eps for t in update.values() if t.is_floating_point()]
    return 2.0 * max(eps, default=0.0)


def clip_by_l2(update: State, max_norm: float) -> tuple[State, float]:
    """``Δ · min(1, S / ‖Δ‖)`` over all tensors jointly (SPEC §3.1); returns the clipped
    update and the ORIGINAL norm ``‖Δ‖``.

    An update already within ``S`` comes back unchanged (values identical). A clipped one
    is scaled in float64 with a rounding margin, so its norm is ≤ S also in its own dtype.
    """
    if not max_norm > 0:
        raise ValueError(f"clip norm {max_norm} must be > 0")
    norm = l2_norm(update)
    if norm <= max_norm:
        return {k: v.clone() for k, v in update.items()}, norm
    factor = max_norm / norm * (1.0 - _rounding_margin(update))
    clipped = {k: (v.to(torch.float64) * factor).to(v.dtype) for k, v in update.items()}
    return clipped, norm


def gaussian_noise_like(state: State, std: float, generator: torch.Generator,
                        dtype: torch.dtype | None = None) -> State:
    """Independent ``N(0, std²)`` for every coordinate of ``state`` (same keys and shapes;
    dtype of each tensor unless ``dtype`` is given). Keys are drawn in sorted order so the
    noise depends only on the generator's seed, not on dict order."""
    if not std >= 0:
        raise ValueError(f"noise std {std} must be >= 0")
    out: State = {}
    for key in sorted(state):
        t = state[key]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64, device="cpu")
        out[key] = (noise * std).to(dtype or t.dtype)
    return {k: out[k] for k in state}


def sum_states(states: Sequence[State], template: State | None = None) -> State:
    """Per-key float64 sum; with no states, float64 zeros shaped like ``template``."""
    base = states[0] if states else template
    if base is None:
        raise ValueError("summing no states needs a template for the keys and shapes")
    out = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in base.items()}
    for s in states:
        if s.keys() != out.keys():
            raise ValueError("client updates have different keys; cannot sum them")
        for k, v in s.items():
            out[k] += v.detach().to(torch.float64)
    return out


def dp_fedavg_aggregate(clipped_updates: Sequence[State], noise_multiplier: float, clip: float,
                        expected_cohort: float, generator: torch.Generator,
                        template: State | None = None) -> State:
    """``(Σ_i clipped Δ_i + N(0, z² S² I)) / (q·N)`` — SPEC §3.1, float64 result.

    The denominator is the EXPECTED cohort ``q·N``, not the number of replies: the actual
    count depends on who was sampled and would itself leak (McMahan et al. 2018, the
    fixed-denominator estimator ``f̃_f``). ``template`` gives keys and shapes when no
    client replied; the noise is still added then (see ``fedpeft.stages.user_dp``).
    The caller must have clipped every update to ``clip`` (:func:`clip_by_l2`).
    """
    if not expected_cohort > 0:
        raise ValueError(f"expected cohort {expected_cohort} must be > 0")
    if not clip > 0:
        raise ValueError(f"clip norm {clip} must be > 0")
    total = sum_states(clipped_updates, template)
    noise = gaussian_noise_like(total, float(noise_multiplier) * float(clip), generator,
                                dtype=torch.float64)
    return {k: (total[k] + noise[k]) / float(expected_cohort) for k in total}


__all__ = ["State", "clip_by_l2", "dp_fedavg_aggregate", "gaussian_noise_like", "l2_norm", "sum_states"]
