"""Server optimisers (SPEC §3.6, Reddi et al. 2021) against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedpeft.server_optim import (
    SERVER_OPTIMIZERS,
    FedAdam,
    FedAvgM,
    FedYogi,
    NoServerOptimizer,
    build_server_optimizer,
)

F64 = torch.float64


def _t(values: list[float], dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _run(opt, x0: list[float], deltas: list[list[float]]) -> list[torch.Tensor]:
    """Feed ``aggregate = xₜ + Δₜ`` for each Δ, returning every ``xₜ₊₁``."""
    x = {"w": _t(x0)}
    out = []
    for d in deltas:
        x = opt.step(x, {"w": x["w"] + _t(d)})
        out.append(x["w"])
    return out


def _sign(a: float) -> float:
    return float((a > 0) - (a < 0))


def _reference_adaptive(yogi: bool, x0: list[float], deltas: list[list[float]], lr: float,
                        b1: float, b2: float, tau: float):
    """Reddi et al. Algorithm 2 (no bias correction, m₀ = v₀ = 0) on plain floats."""
    x, m, v = list(x0), [0.0] * len(x0), [0.0] * len(x0)
    xs, vs = [], []
    for d in deltas:
        for i, di in enumerate(d):
            m[i] = b1 * m[i] + (1 - b1) * di
            if yogi:
                v[i] = v[i] - (1 - b2) * di * di * _sign(v[i] - di * di)
            else:
                v[i] = b2 * v[i] + (1 - b2) * di * di
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        xs.append(list(x))
        vs.append(list(v))
    return xs, vs


# Coordinate 1 is where Yogi's sign flips: v₁ = 0.05 > Δ₂² = 0.015625 (sign +1 after the
# first step's −1). Coordinate 3 starts with Δ = 0 (sign(0) = 0 keeps v at 0).
X0 = [1.0, -2.0, 0.5, 0.0]
DELTAS = [[0.5, 1.0, -0.25, 0.0],
          [0.25, 0.125, -0.25, 0.5],
          [-0.5, -0.5, 1.0, 0.0]]
HP = {"lr": 0.5, "b1": 0.8, "b2": 0.95, "tau": 0.01}


# -- none ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_none_with_lr_one_returns_the_aggregate_bit_identically(dtype):
    # In float64, x + (a − x) is usually a few ulps off a; the result must be a itself.
    torch.manual_seed(0)
    glob = {"w": torch.randn(3, 5, dtype=dtype) * 100, "b": torch.randn(7, dtype=dtype)}
    agg = {"w": torch.randn(3, 5, dtype=dtype) * 1e-3 + 0.1, "b": torch.randn(7, dtype=dtype) / 3}
    out = build_server_optimizer("none").step(glob, agg)
    for k in agg:
        assert out[k].dtype == agg[k].dtype
        assert torch.equal(out[k], agg[k])


def test_none_with_lr_half_returns_the_midpoint():
    opt = NoServerOptimizer(lr=0.5)
    out = opt.step({"w": _t([1.0, 3.0, -4.0])}, {"w": _t([3.0, 7.0, 0.0])})
    assert torch.equal(out["w"], _t([2.0, 5.0, -2.0]))


# -- fedavgm ------------------------------------------------------------------------------
def test_fedavgm_three_steps_match_the_momentum_recursion():
    # β = 0.5, η = 0.5, m₀ = 0:
    # coord 0: Δ = 2, −1, 4 -> m = 2, 0, 4       -> x = 1+1 = 2, 2+0 = 2, 2+2 = 4
    # coord 1: Δ = 1, 1, 1  -> m = 1, 1.5, 1.75  -> x = 0.5, 1.25, 2.125
    xs = _run(FedAvgM(lr=0.5, momentum=0.5), [1.0, 0.0], [[2.0, 1.0], [-1.0, 1.0], [4.0, 1.0]])
    assert torch.equal(xs[0], _t([2.0, 0.5]))
    assert torch.equal(xs[1], _t([2.0, 1.25]))
    assert torch.equal(xs[2], _t([4.0, 2.125]))


def test_fedavgm_defaults_are_beta_point_nine_and_lr_one():
    # m = 1, 1.9, 2.71 -> x = 1, 2.9, 5.61
    xs = _run(build_server_optimizer("fedavgm"), [0.0], [[1.0], [1.0], [1.0]])
    torch.testing.assert_close(torch.stack(xs).flatten(), _t([1.0, 2.9, 5.61]), rtol=0, atol=1e-12)


# -- fedadam / fedyogi --------------------------------------------------------------------
def test_fedadam_first_step_matches_hand_value_with_default_hyperparameters():
    # β₁ = 0.9, β₂ = 0.99, τ = 1e-3, Δ = 0.5: m = 0.05, v = 0.0025, √v = 0.05
    # x₁ = 1 + 0.05 / 0.051 = 1 + 50/51. With Flower's bias correction it would differ.
    (x1,) = _run(build_server_optimizer("fedadam"), [1.0], [[0.5]])
    torch.testing.assert_close(x1, _t([1.0 + 50.0 / 51.0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_three_steps_match_plain_python(name):
    opt = build_server_optimizer(name, lr=HP["lr"], momentum=HP["b1"], beta2=HP["b2"], tau=HP["tau"])
    ref_xs, ref_vs = _reference_adaptive(name == "fedyogi", X0, DELTAS, **HP)
    x = {"w": _t(X0)}
    for d, ref_x, ref_v in zip(DELTAS, ref_xs, ref_vs):
        x = opt.step(x, {"w": x["w"] + _t(d)})
        torch.testing.assert_close(x["w"], _t(ref_x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state_dict()[1]["v/w"], _t(ref_v), rtol=1e-12, atol=1e-12)


def test_yogi_second_moment_flips_sign_where_adam_does_not():
    # Hand values for coordinate 1 (Δ = 1, 0.125, −0.5; β₂ = 0.95):
    #   v₁ = 0.05 for both (Yogi: sign(0 − 1) = −1).
    #   Yogi: v₁ > Δ₂² = 0.015625 -> sign +1 -> v₂ = 0.05 − 0.05·0.015625 = 0.04921875
    #   Adam: v₂ = 0.95·0.05 + 0.05·0.015625 = 0.04828125
    #   Yogi: v₂ < Δ₃² = 0.25 -> sign −1 -> v₃ = 0.04921875 + 0.0125 = 0.06171875
    hand_yogi = [0.05, 0.04921875, 0.06171875]
    hand_adam_v2 = 0.04828125
    for cls, expected_v2 in [(FedYogi, hand_yogi[1]), (FedAdam, hand_adam_v2)]:
        opt = cls(lr=HP["lr"], beta1=HP["b1"], beta2=HP["b2"], tau=HP["tau"])
        x = {"w": _t(X0)}
        vs = []
        for d in DELTAS:
            x = opt.step(x, {"w": x["w"] + _t(d)})
            vs.append(float(opt.state_dict()[1]["v/w"][1]))
        assert vs[0] == pytest.approx(0.05, abs=1e-15)
        assert vs[1] == pytest.approx(expected_v2, abs=1e-15)
    assert vs[2] != pytest.approx(hand_yogi[2])  # Adam's v₃ is not Yogi's
    # and the plain-Python reference agrees with the hand values
    _, ref_vs = _reference_adaptive(True, X0, DELTAS, **HP)
    assert [v[1] for v in ref_vs] == pytest.approx(hand_yogi, abs=1e-15)


# -- dtypes and keys ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["none", "fedavgm", "fedadam", "fedyogi"])
def test_float32_in_float32_out_computed_in_float64(name):
    torch.manual_seed(1)
    glob = {"w": torch.randn(64)}
    agg = {"w": glob["w"] + torch.randn(64) / 7}
    opt = build_server_optimizer(name, lr=0.3)
    out = opt.step(glob, agg)
    assert out["w"].dtype == torch.float32
    x = [float(v) for v in glob["w"]]
    d = [float(a) - float(b) for a, b in zip(agg["w"], glob["w"])]  # float64 Δ
    if name == "none":
        ref = [xi + 0.3 * di for xi, di in zip(x, d)]
    elif name == "fedavgm":
        ref = [xi + 0.3 * di for xi, di in zip(x, d)]  # m₁ = Δ₁
    else:
        (ref,), _ = _reference_adaptive(name == "fedyogi", x, [d], 0.3, 0.9, 0.99, 1e-3)
    assert torch.equal(out["w"], torch.tensor(ref, dtype=F64).to(torch.float32))


def test_keys_missing_from_global_pass_through_and_global_only_keys_are_dropped():
    opt = build_server_optimizer("fedadam")
    glob = {"w": _t([1.0]), "gone": _t([5.0])}
    new = torch.tensor([1.5, -2.0], dtype=torch.float16)
    out = opt.step(glob, {"w": _t([2.0]), "new": new})
    assert set(out) == {"w", "new"}
    assert out["new"].dtype == torch.float16 and torch.equal(out["new"], new)
    assert set(opt.state_dict()[1]) == {"m/w", "v/w"}


def test_shape_change_passes_through_and_restarts_that_keys_momentum():
    opt = FedAvgM(lr=1.0, momentum=0.5)
    x = opt.step({"A": torch.zeros(2, 3, dtype=F64)}, {"A": torch.ones(2, 3, dtype=F64)})
    assert torch.equal(x["A"], torch.ones(2, 3, dtype=F64))  # m₁ = 1
    grown = torch.full((4, 3), 7.0, dtype=F64)  # e.g. a DP-DyLoRA rank change
    x = opt.step(x, {"A": grown})
    assert torch.equal(x["A"], grown)
    assert "m/A" not in opt.state_dict()[1]
    # momentum restarts at 0: x = 7 + 1·(0.5·0 + 2) = 9, not 7 + (0.5·1 + 2)
    x = opt.step(x, {"A": grown + 2.0})
    assert torch.equal(x["A"], torch.full((4, 3), 9.0, dtype=F64))


# -- checkpoints --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["none", "fedavgm", "fedadam", "fedyogi"])
def test_state_dict_round_trip_continues_identically(name):
    torch.manual_seed(2)
    hp = {"lr": 0.7, "momentum": 0.6, "beta2": 0.9, "tau": 0.05}
    a = build_server_optimizer(name, **hp)
    x = {"A": torch.randn(2, 4), "B": torch.randn(4, 2)}
    for _ in range(2):
        x = a.step(x, {k: v + torch.randn_like(v) / 5 for k, v in x.items()})
    meta, tensors = a.state_dict()
    b = build_server_optimizer(name, **hp)
    b.load_state_dict(json.loads(json.dumps(meta)), st_load(st_save(tensors)))
    assert b.steps == a.steps == 2
    fresh = build_server_optimizer(name, **hp)
    agg = {k: v + torch.randn_like(v) / 5 for k, v in x.items()}
    out_a, out_b, out_fresh = a.step(x, agg), b.step(x, agg), fresh.step(x, agg)
    for k in agg:
        assert torch.equal(out_a[k], out_b[k])
    if SERVER_OPTIMIZERS.get(name).slots:  # the loaded state mattered
        assert not torch.equal(out_a["A"], out_fresh["A"])


def test_load_state_dict_rejects_another_optimizers_state():
    meta, tensors = build_server_optimizer("fedavgm").state_dict()
    with pytest.raises(ValueError, match="fedavgm"):
        build_server_optimizer("fedadam").load_state_dict(meta, tensors)


# -- factory ------------------------------------------------------------------------------
def test_registry_names():
    assert SERVER_OPTIMIZERS.names() == ["fedadam", "fedavgm", "fedyogi", "none"]


@pytest.mark.parametrize("name", ["adam", "FedAdam", "", "yogi"])
def test_factory_rejects_unknown_names(name):
    with pytest.raises(ValueError) as exc:
        build_server_optimizer(name)
    assert repr(name) in str(exc.value) and "fedyogi" in str(exc.value)


@pytest.mark.parametrize("option, value", [
    ("lr", 0.0), ("lr", -0.1), ("lr", float("nan")), ("lr", float("inf")),
    ("momentum", -0.1), ("momentum", 1.0), ("momentum", float("nan")),
    ("beta2", 1.0), ("beta2", -0.5), ("beta2", 1.5),
    ("tau", 0.0), ("tau", -1e-3), ("tau", float("inf")),
])
@pytest.mark.parametrize("name", ["none", "fedadam"])
def test_factory_rejects_out_of_range_values(name, option, value):
    with pytest.raises(ValueError) as exc:
        build_server_optimizer(name, **{option: value})
    assert str(value) in str(exc.value)


def test_factory_accepts_boundary_values():
    opt = build_server_optimizer("fedyogi", lr=1e-6, momentum=0.0, beta2=0.0, tau=1e-12)
    assert isinstance(opt, FedYogi)
    assert (opt.lr, opt.beta1, opt.beta2, opt.tau) == (1e-6, 0.0, 0.0, 1e-12)
