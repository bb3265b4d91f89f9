"""fedpeft.privacy.mechanisms: joint L2 clipping and the fixed-denominator Gaussian
mechanism of user-level DP-FedAvg (SPEC §3.1)."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.privacy.mechanisms import clip_by_l2, dp_fedavg_aggregate, gaussian_noise_like


def random_update(seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"layer.0.lora_A.default.weight": (4, 16), "layer.0.lora_B.default.weight": (16, 4),
              "classifier.weight": (2, 16)}
    return {k: (torch.randn(s, generator=g) * scale).to(dtype) for k, s in shapes.items()}


def joint_norm(update: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([v.double().flatten() for v in update.values()]).norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(5))
def test_clipped_norm_is_at_most_s_in_the_tensors_own_dtype(seed, dtype):
    update = random_update(seed, scale=3.0, dtype=dtype)
    clipped, norm = clip_by_l2(update, 1.0)
    assert norm == pytest.approx(joint_norm(update), rel=1e-12)
    assert norm > 1.0
    assert joint_norm(clipped) <= 1.0
    assert joint_norm(clipped) >= 1.0 - 4 * torch.finfo(dtype).eps  # clipped TO S, not far below
    assert all(clipped[k].dtype == dtype and clipped[k].shape == update[k].shape for k in update)


def test_clipping_is_joint_over_all_tensors_not_per_tensor():
    # ‖a‖ = 3, ‖b‖ = 4, joint norm 5; S = 2.5 halves both (per-tensor clipping would not).
    update = {"a": torch.tensor([3.0, 0.0], dtype=torch.float64),
              "b": torch.tensor([0.0, 4.0], dtype=torch.float64)}
    clipped, norm = clip_by_l2(update, 2.5)
    assert norm == 5.0
    assert torch.allclose(clipped["a"], torch.tensor([1.5, 0.0], dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(clipped["b"], torch.tensor([0.0, 2.0], dtype=torch.float64), rtol=1e-12)


def test_clipping_keeps_the_direction():
    update = random_update(7, scale=5.0)
    clipped, norm = clip_by_l2(update, 0.5)
    flat = torch.cat([v.double().flatten() for v in update.values()])
    flat_c = torch.cat([v.double().flatten() for v in clipped.values()])
    assert torch.allclose(flat_c, flat * (0.5 / norm), rtol=1e-5, atol=1e-8)


def test_update_already_within_s_is_returned_unchanged():
    update = random_update(3, scale=0.01)
    assert joint_norm(update) < 1.0
    clipped, norm = clip_by_l2(update, 1.0)
    assert norm == pytest.approx(joint_norm(update))
    assert all(torch.equal(clipped[k], update[k]) for k in update)
    assert all(clipped[k] is not update[k] for k in update)  # a copy, safe to modify


def test_fixed_denominator_divides_by_expected_cohort_not_by_replies():
    updates = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -1.0])},
               {"w": torch.tensor([0.5, 0.5])}]
    out = dp_fedavg_aggregate(updates, noise_multiplier=0.0, clip=10.0, expected_cohort=10.0,
                              generator=torch.Generator().manual_seed(0))
    # hand computation: (1 + 3 + 0.5) / 10, (2 - 1 + 0.5) / 10
    assert torch.allclose(out["w"], torch.tensor([0.45, 0.15], dtype=torch.float64), rtol=0, atol=1e-15)
    assert out["w"].dtype == torch.float64


def test_noise_std_of_the_average_is_z_s_over_expected_cohort():
    z, s, m, d = 1.3, 0.7, 12.5, 200_000
    g = torch.Generator().manual_seed(1)
    updates = [clip_by_l2({"a": torch.randn(d // 2, generator=g), "b": torch.randn(d // 2, generator=g)},
                          s)[0] for _ in range(3)]
    out = dp_fedavg_aggregate(updates, z, s, m, torch.Generator().manual_seed(2))
    signal = torch.cat([sum(u[k].double() for u in updates) / m for k in ("a", "b")])
    noise = torch.cat([out["a"], out["b"]]) - signal
    sigma = z * s / m
    # (d-1)·s²/σ² ~ chi²(d-1): relative std of s²/σ² is sqrt(2/(d-1)); allow 6 of them.
    ratio = float(noise.var(unbiased=True)) / sigma ** 2
    assert abs(ratio - 1.0) < 6 * math.sqrt(2 / (d - 1)), ratio
    assert abs(float(noise.mean())) < 6 * sigma / math.sqrt(d)


def test_empty_cohort_still_releases_noise_shaped_like_the_template():
    template = {"a": torch.zeros(3, 5), "b": torch.zeros(7)}
    out = dp_fedavg_aggregate([], 1.0, 2.0, 4.0, torch.Generator().manual_seed(0), template=template)
    assert {k: v.shape for k, v in out.items()} == {"a": (3, 5), "b": (7,)}
    assert all(float(v.abs().sum()) > 0 for v in out.values())
    with pytest.raises(ValueError, match="template"):
        dp_fedavg_aggregate([], 1.0, 2.0, 4.0, torch.Generator().manual_seed(0))


def test_noise_is_reproducible_from_the_seed_and_independent_of_key_order():
    state = {"x": torch.zeros(10), "y": torch.zeros(3, 3)}
    swapped = {"y": state["y"], "x": state["x"]}
    n1 = gaussian_noise_like(state, 1.0, torch.Generator().manual_seed(5))
    n2 = gaussian_noise_like(swapped, 1.0, torch.Generator().manual_seed(5))
    n3 = gaussian_noise_like(state, 1.0, torch.Generator().manual_seed(6))
    assert all(torch.equal(n1[k], n2[k]) for k in state)
    assert not torch.equal(n1["x"], n3["x"])
    assert n1["y"].shape == (3, 3) and n1["x"].dtype == torch.float32
