"""The iterate average (--ema) against the weighted-mean formula it implements."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.iterate_average import IterateAverage


def _by_formula(xs: list[np.ndarray], beta: float) -> np.ndarray:
    """x̄_t = Σ_i β^{t−i} x_i / Σ_i β^{t−i} — the bias-corrected EMA written as a weighted mean."""
    t = len(xs)
    w = np.array([beta ** (t - 1 - i) for i in range(t)])
    return np.tensordot(w, np.stack(xs), axes=1) / w.sum()


def test_average_is_the_geometrically_weighted_mean_of_the_iterates() -> None:
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(3, 4)) for _ in range(7)]
    avg = IterateAverage(0.8)
    for i, x in enumerate(xs, 1):
        avg.update({"w": torch.tensor(x, dtype=torch.float32)})
        got = avg.average({"w": torch.zeros(3, 4)})["w"]
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), _by_formula(xs[:i], 0.8), rtol=1e-6, atol=1e-6)


def test_hand_computed_value_and_no_pull_to_the_initial_model() -> None:
    avg = IterateAverage(0.5)
    for x in (0.0, 2.0, 4.0):
        avg.update({"w": torch.tensor([x])})
    # weights 0.25, 0.5, 1 -> (0 + 1 + 4) / 1.75
    assert avg.average({"w": torch.zeros(1)})["w"].item() == pytest.approx(5 / 1.75)
    one = IterateAverage(0.99)
    one.update({"w": torch.tensor([3.0])})
    assert one.average({"w": torch.zeros(1)})["w"].item() == pytest.approx(3.0)  # not 0.03


def test_a_tensor_that_changes_shape_restarts_and_beta_zero_is_the_last_iterate() -> None:
    avg = IterateAverage(0.9)
    avg.update({"a": torch.ones(2), "b": torch.ones(2)})
    avg.update({"a": torch.full((3,), 5.0), "b": torch.full((2,), 3.0)})
    out = avg.average({"a": torch.zeros(3), "b": torch.zeros(2), "new": torch.full((1,), 7.0)})
    assert out["a"].tolist() == [5.0, 5.0, 5.0]
    assert out["b"][0].item() == pytest.approx((0.9 * 1 + 3) / 1.9)
    assert out["new"].item() == 7.0  # never averaged: taken as is
    last = IterateAverage(0.0)
    for x in (1.0, 9.0):
        last.update({"w": torch.tensor([x])})
    assert last.average({"w": torch.zeros(1)})["w"].item() == 9.0


def test_checkpoint_round_trip_continues_identically() -> None:
    xs = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    whole, first = IterateAverage(0.7), IterateAverage(0.7)
    for x in xs:
        whole.update({"w": x})
    for x in xs[:3]:
        first.update({"w": x})
    scalars, tensors = first.state_dict()
    resumed = IterateAverage(0.7)
    resumed.load_state_dict(scalars, tensors)
    for x in xs[3:]:
        resumed.update({"w": x})
    like = {"w": torch.zeros(5)}
    assert torch.equal(resumed.average(like)["w"], whole.average(like)["w"])


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_bad_beta_is_refused(beta: float) -> None:
    with pytest.raises(ValueError, match=str(beta)):
        IterateAverage(beta)
