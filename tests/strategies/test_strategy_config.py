"""Strategy options reach the strategy through the run config."""

from __future__ import annotations

from fedpeft.adapters.base import Adapter, AdapterSpec
from fedpeft.settings import resolve
from strategies import STRATEGIES


class _NoInject(Adapter):
    name = "test"

    def inject(self, model):  # pragma: no cover
        return model


def test_lora_fair_options_from_config():
    cfg = resolve({"strategy": "lora-fair", "fair_solver": "ridge", "fair_lambda": 0.25})
    strat = STRATEGIES.get("lora-fair").from_config(_NoInject(AdapterSpec()), None, cfg)
    assert (strat.solver, strat.lam) == ("ridge", 0.25)


def test_server_optimiser_from_config_moves_the_global_by_hand_computed_momentum():
    """--server-opt fedavgm --server-lr 0.5 --server-momentum 0.5: x₁ = x₀ + 0.5·Δ₁,
    m₂ = 0.5·Δ₁ + Δ₂, x₂ = x₁ + 0.5·m₂ (SPEC §3.6), through the strategy built from config."""
    import torch

    cfg = resolve({"server_opt": "fedavgm", "server_lr": 0.5, "server_momentum": 0.5})
    strat = STRATEGIES.get("fedavg").from_config(_NoInject(AdapterSpec()), None, cfg)
    x0 = {"w": torch.tensor([1.0, -2.0])}
    x1 = strat.server_step(x0, {"w": torch.tensor([3.0, -2.0])})          # Δ₁ = (2, 0)
    assert torch.equal(x1["w"], torch.tensor([2.0, -2.0]))
    x2 = strat.server_step(x1, {"w": torch.tensor([2.0, 2.0])})           # Δ₂ = (0, 4), m₂ = (1, 4)
    assert torch.equal(x2["w"], torch.tensor([2.5, 0.0]))
    plain = STRATEGIES.get("fedavg").from_config(_NoInject(AdapterSpec()), None, resolve({}))
    assert torch.equal(plain.server_step(x0, {"w": torch.tensor([3.0, 7.0])})["w"], torch.tensor([3.0, 7.0]))
