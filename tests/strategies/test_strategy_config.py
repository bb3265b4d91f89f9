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
    strat = STRATEGIES.get("lora-fair").from_config(_NoInject(AdapterSpec()), cfg)
    assert (strat.solver, strat.lam) == ("ridge", 0.25)


def test_server_optimiser_from_config_moves_the_round_aggregate_by_hand_computed_momentum(flower_task_identity):
    """--server-opt fedavgm --server-lr 0.5 --server-momentum 0.5: x₁ = x₀ + 0.5·Δ₁,
    m₂ = 0.5·Δ₁ + Δ₂, x₂ = x₁ + 0.5·m₂ (SPEC §3.6), applied by the round to FedAvg's aggregate."""
    import torch
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedpeft.records import from_record, to_record
    from fedpeft.federation.round import RoundStrategy
    from fedpeft.pipeline import Pipeline
    from fedpeft.server_optim import build_server_optimizer

    class OneClient:
        def sample(self, server_round: int) -> list[tuple[int, int]]:
            return [(0, 1)]

    def round_of(cfg, x, upload, server_round, rs=None):
        rs = rs or RoundStrategy(
            STRATEGIES.get("fedavg").from_config(_NoInject(AdapterSpec()), cfg), Pipeline([]), OneClient(),
            upload_layout=lambda rank: {"w": (2,)},
            server_opt=build_server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum,
                                              cfg.server_beta2, cfg.server_tau))
        (msg,) = rs.configure_train(server_round, to_record(x), ConfigRecord({"round-rank": 0}), grid=None)
        reply = Message(RecordDict({"arrays": to_record({"w": upload}), "metrics": MetricRecord(
            {"client-id": 0, "num-examples": 5, "train-loss": 1.0})}), reply_to=msg)
        arrays, _ = rs.aggregate_train(server_round, [reply])
        return from_record(arrays), rs

    cfg = resolve({"server_opt": "fedavgm", "server_lr": 0.5, "server_momentum": 0.5})
    x0 = {"w": torch.tensor([1.0, -2.0])}
    x1, rs = round_of(cfg, x0, torch.tensor([3.0, -2.0]), 1)              # Δ₁ = (2, 0)
    assert torch.equal(x1["w"], torch.tensor([2.0, -2.0]))
    x2, _ = round_of(cfg, x1, torch.tensor([2.0, 2.0]), 2, rs)            # Δ₂ = (0, 4), m₂ = (1, 4)
    assert torch.equal(x2["w"], torch.tensor([2.5, 0.0]))
    plain, _ = round_of(resolve({}), x0, torch.tensor([3.0, 7.0]), 1)
    assert torch.equal(plain["w"], torch.tensor([3.0, 7.0]))
