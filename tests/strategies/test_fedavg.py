"""FedAvg weighting against a hand computation (SPEC §5)."""

from __future__ import annotations

import pytest
import torch

from fedpeft.adapters.base import Adapter, AdapterSpec
from strategies import STRATEGIES
from fedpeft.aggregation import lora_aggregation_error, weighted_mean
from fedpeft.strategy import ClientUpdate


class _NoInject(Adapter):
    name = "test"

    def inject(self, model):  # pragma: no cover - never called
        return model


def _update(state, n):
    return ClientUpdate(node_id=n, client_id=n, num_examples=n, state=state, train_loss=0.0, bytes_up=0)


def test_weighted_mean_matches_hand_computation():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = weighted_mean([a, b], [1, 3])
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]; (1*0 + 3*4)/4 = 3
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[3.0]]))


def test_fedavg_of_identical_updates_returns_that_update():
    strat = STRATEGIES.get("fedavg")(_NoInject(AdapterSpec()))
    same = {"x.lora_A.default.weight": torch.randn(2, 5), "x.lora_B.default.weight": torch.randn(4, 2)}
    glob = {k: torch.zeros_like(v) for k, v in same.items()}
    out = strat.aggregate(glob, [_update(same, 3), _update(dict(same), 7)])
    for k in same:
        torch.testing.assert_close(out[k], same[k])
    # identical clients: the average of products equals the product of averages
    assert lora_aggregation_error([same, same], [3, 7], out, [("x.lora_A.default.weight", "x.lora_B.default.weight")]) < 1e-12


def test_fedavg_respects_example_weights():
    strat = STRATEGIES.get("fedavg")(_NoInject(AdapterSpec()))
    glob = {"h": torch.zeros(3)}
    out = strat.aggregate(glob, [_update({"h": torch.ones(3)}, 1), _update({"h": torch.full((3,), 5.0)}, 3)])
    torch.testing.assert_close(out["h"], torch.full((3,), (1 * 1 + 3 * 5) / 4))


def test_aggregation_error_formula_for_two_clients():
    torch.manual_seed(0)
    A1, A2, B1, B2 = torch.randn(2, 6), torch.randn(2, 6), torch.randn(4, 2), torch.randn(4, 2)
    p = [0.25, 0.75]
    s1 = {"l.lora_A.default.weight": A1, "l.lora_B.default.weight": B1}
    s2 = {"l.lora_A.default.weight": A2, "l.lora_B.default.weight": B2}
    g = weighted_mean([s1, s2], p)
    err = lora_aggregation_error([s1, s2], p, g, [("l.lora_A.default.weight", "l.lora_B.default.weight")])
    ideal = p[0] * B1 @ A1 + p[1] * B2 @ A2
    # SPEC §1.1 identity: Σ p_i B_i A_i − B̄Ā = ½ Σ_i Σ_j p_i p_j (B_i − B_j)(A_i − A_j)
    gap = 0.5 * 2 * p[0] * p[1] * (B1 - B2) @ (A1 - A2)
    assert err == pytest.approx(float(gap.norm() / ideal.norm()), rel=1e-5)
    assert err > 0
