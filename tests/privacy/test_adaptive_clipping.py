"""fedpeft.privacy.adaptive_clipping: Andrew et al. 2021 quantile-tracking clip (SPEC §3.1)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fedpeft.errors import UsageError
from fedpeft.privacy.adaptive_clipping import (
    AdaptiveClipConfig,
    next_clip,
    noised_quantile,
    update_noise_multiplier,
)


def test_defaults_are_those_of_the_spec():
    cfg = AdaptiveClipConfig()
    assert (cfg.target_quantile, cfg.clip_lr) == (0.5, 0.2)
    assert cfg.count_std(100) == 5.0   # expected cohort / 20


def test_update_noise_multiplier_hand_value():
    # z = 1, σ_b = 5: z_Δ = (1 − 1/100)^(−1/2)
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx(0.99 ** -0.5, rel=1e-12)


@pytest.mark.parametrize("z,cohort", [(0.7, 100), (1.48, 100), (0.3, 10), (2.0, 1000)])
def test_update_and_count_noise_together_equal_one_gaussian_with_z(z, cohort):
    """Thm. 1 from first principles: divide the update part (sensitivity S, noise z_Δ S) and
    the centred count (sensitivity ½, noise σ_b) by their noise stds; the joint L2
    sensitivity must be 1/z. Flower's own implementation must give the same z_Δ."""
    sigma_b = AdaptiveClipConfig().count_std(cohort)
    z_update = update_noise_multiplier(z, sigma_b)
    joint_sensitivity = math.hypot(1.0 / z_update, 0.5 / sigma_b)
    assert joint_sensitivity == pytest.approx(1.0 / z, rel=1e-12)
    assert z_update > z
    assert compute_adaptive_noise_params(z, cohort, None) == pytest.approx((sigma_b, z_update))


def test_count_noise_too_small_for_the_budget_is_a_usage_error():
    with pytest.raises(UsageError, match="cohort"):
        update_noise_multiplier(1.2, AdaptiveClipConfig().count_std(10))  # 2σ_b = 1 < z


def test_next_clip_geometric_update_hand_values():
    # every client below C: b̃ = 1 → C·exp(−0.2·0.5); none below: C·exp(+0.2·0.5)
    assert next_clip(2.0, 1.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.1))
    assert next_clip(2.0, 0.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))
    assert next_clip(2.0, 0.5, 0.5, 0.2) == 2.0


def test_noised_quantile_without_noise_is_the_fraction_below_over_expected_cohort():
    norms = [0.1, 0.5, 0.9, 1.5, 3.0]          # 3 of 5 at or below C = 1
    g = torch.Generator().manual_seed(0)
    # expected cohort 5: 3/5; expected cohort 10: (3 − 5/2)/10 + 1/2 (centred bits)
    assert noised_quantile(norms, 1.0, 1e-12, 5.0, g) == pytest.approx(0.6)
    assert noised_quantile(norms, 1.0, 1e-12, 10.0, g) == pytest.approx(0.55)


def test_noised_quantile_noise_has_std_sigma_b_over_expected_cohort():
    g = torch.Generator().manual_seed(3)
    draws = torch.tensor([noised_quantile([], 1.0, 5.0, 100.0, g) for _ in range(4000)])
    # no clients: centred count 0 → b̃ = 0.5 + N(0, (5/100)²)
    assert float(draws.mean()) == pytest.approx(0.5, abs=6 * 0.05 / math.sqrt(4000))
    assert float(draws.std()) == pytest.approx(0.05, rel=6 * math.sqrt(1 / (2 * 3999)))


@pytest.mark.parametrize("start", [30.0, 0.3])
def test_clip_converges_to_the_target_quantile_of_a_synthetic_norm_distribution(start):
    """Norms ~ LogNormal(log 3, 0.5): the median is 3. From 10x above or below, 150 noised
    rounds of 100 clients must bring C to the median within 10%."""
    cfg, cohort = AdaptiveClipConfig(), 100
    g = torch.Generator().manual_seed(11)
    clip, history = start, []
    for _ in range(150):
        norms = torch.exp(math.log(3.0) + 0.5 * torch.randn(cohort, generator=g)).tolist()
        b = noised_quantile(norms, clip, cfg.count_std(cohort), cohort, g)
        clip = next_clip(clip, b, cfg.target_quantile, cfg.clip_lr)
        history.append(clip)
    late = sum(history[-50:]) / 50
    assert late == pytest.approx(3.0, rel=0.10)
    # the fraction of the distribution below C (log-normal CDF) is close to γ = 0.5
    cdf = 0.5 * (1 + math.erf((math.log(late) - math.log(3.0)) / (0.5 * math.sqrt(2))))
    assert abs(cdf - 0.5) < 0.08


def test_config_validation():
    with pytest.raises(UsageError):
        AdaptiveClipConfig(target_quantile=1.0)
    with pytest.raises(UsageError):
        AdaptiveClipConfig(clip_lr=0.0)
