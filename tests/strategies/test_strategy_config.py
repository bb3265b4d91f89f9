"""Strategy options reach the strategy through the run config."""

from __future__ import annotations

from fedpeft.adapters.base import Adapter, AdapterSpec
from fedpeft.config import resolve
from strategies import STRATEGIES


class _NoInject(Adapter):
    name = "test"

    def inject(self, model):  # pragma: no cover
        return model


def test_lora_fair_options_from_config():
    cfg = resolve({"strategy": "lora-fair", "fair_solver": "ridge", "fair_lambda": 0.25})
    strat = STRATEGIES.get("lora-fair").from_config(_NoInject(AdapterSpec()), None, cfg)
    assert (strat.solver, strat.lam) == ("ridge", 0.25)


def test_fedavg_from_config_is_plain():
    cfg = resolve({})
    strat = STRATEGIES.get("fedavg").from_config(_NoInject(AdapterSpec()), None, cfg)
    assert strat.name == "fedavg"
