"""The ``lora-fair`` strategy (SPEC §2.2, §5) on fake client uploads: lower aggregation error
than FedAvg, Ā and the head untouched, and the same through Flower's ``aggregate_train``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.adapters.base import Adapter, AdapterSpec, State
from fedpeft.records import to_record
from strategies import STRATEGIES
from fedpeft.aggregation import lora_aggregation_error
from fedpeft.strategy import ClientUpdate
from strategies.lora_fair import LoraFair

LAYERS = ("enc.0.query", "enc.0.value", "enc.1.query")
D, R = 16, 4
EXAMPLES = [10, 30, 60]


class _NoInject(Adapter):
    name = "test"

    def inject(self, model):  # pragma: no cover - never called
        return model


def _a(layer: str) -> str:
    return f"{layer}.lora_A.default.weight"


def _b(layer: str) -> str:
    return f"{layer}.lora_B.default.weight"


def _pairs() -> list[tuple[str, str]]:
    return [(_a(layer), _b(layer)) for layer in LAYERS]


def _heterogeneous_clients(seed: int) -> tuple[State, list[ClientUpdate]]:
    """Float32 states like real uploads: every client's A, B and head differ."""
    g = torch.Generator().manual_seed(seed)
    glob: State = {"head.weight": torch.zeros(3, D)}
    for layer in LAYERS:
        glob[_a(layer)] = torch.randn(R, D, generator=g) / D ** 0.5
        glob[_b(layer)] = torch.zeros(D, R)
    updates = []
    for i, n in enumerate(EXAMPLES):
        state = {k: v + torch.randn(v.shape, generator=g) * 0.3 for k, v in glob.items()}
        updates.append(ClientUpdate(node_id=i + 1, client_id=i, num_examples=n, state=state,
                                    train_loss=1.0, bytes_up=0))
    return glob, updates


def _error(adapter: Adapter, glob: State, updates: list[ClientUpdate], new: State) -> float:
    views = [adapter.client_view(glob, u.state) for u in updates]
    return lora_aggregation_error(views, [u.num_examples for u in updates], new, _pairs())


def test_lora_fair_is_registered_and_needs_individual_updates():
    assert STRATEGIES.get("lora-fair") is LoraFair
    assert LoraFair.needs_individual_updates is True
    assert STRATEGIES.get("fedavg").needs_individual_updates is False


@pytest.mark.parametrize("solver", ["sgd", "ridge"])
def test_lora_fair_global_has_lower_aggregation_error_than_fedavg(solver):
    adapter = _NoInject(AdapterSpec())
    glob, updates = _heterogeneous_clients(seed=0)
    fedavg = STRATEGIES.get("fedavg")(adapter).aggregate(glob, updates)
    fair = STRATEGIES.get("lora-fair")(adapter, solver=solver).aggregate(glob, updates)
    err_avg, err_fair = _error(adapter, glob, updates, fedavg), _error(adapter, glob, updates, fair)
    assert err_avg > 0.1  # heterogeneous clients: FedAvg is clearly inexact
    assert err_fair < 0.9 * err_avg, (err_fair, err_avg)


def test_lora_fair_keeps_a_bar_and_head_and_corrects_only_b():
    adapter = _NoInject(AdapterSpec())
    glob, updates = _heterogeneous_clients(seed=1)
    p = np.asarray(EXAMPLES, dtype=np.float64) / sum(EXAMPLES)
    strategy = STRATEGIES.get("lora-fair")(adapter, solver="ridge", lam=0.01)
    fair = strategy.aggregate(glob, updates)
    assert set(fair) == set(glob)
    for key in fair:
        mean = sum(pi * u.state[key].double().numpy() for pi, u in zip(p, updates))
        assert fair[key].dtype == glob[key].dtype
        if ".lora_B." in key:
            # independent ridge residual in numpy, on top of the plain mean B̄
            a_bar = sum(pi * u.state[key.replace("lora_B", "lora_A")].double().numpy() for pi, u in zip(p, updates))
            dw = sum(pi * u.state[key].double().numpy() @ u.state[key.replace("lora_B", "lora_A")].double().numpy()
                     for pi, u in zip(p, updates))
            delta = (dw - mean @ a_bar) @ a_bar.T @ np.linalg.inv(a_bar @ a_bar.T + 0.01 * np.eye(R))
            np.testing.assert_allclose(fair[key].numpy(), mean + delta, rtol=1e-4, atol=1e-5)
            assert not np.allclose(fair[key].numpy(), mean, atol=1e-3)  # really corrected
        else:  # A and the head: exactly FedAvg
            np.testing.assert_allclose(fair[key].numpy(), mean, rtol=1e-5, atol=1e-6)
    assert set(strategy.last_solves) == {b for _, b in _pairs()}
    assert all(s.cosine_after > s.cosine_before for s in strategy.last_solves.values())


def test_lora_fair_on_identical_clients_changes_nothing():
    adapter = _NoInject(AdapterSpec())
    glob, updates = _heterogeneous_clients(seed=2)
    same = [ClientUpdate(node_id=u.node_id, client_id=u.client_id, num_examples=u.num_examples,
                         state=dict(updates[0].state), train_loss=0.0, bytes_up=0) for u in updates]
    out = STRATEGIES.get("lora-fair")(adapter).aggregate(glob, same)
    for key, value in updates[0].state.items():
        torch.testing.assert_close(out[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"solver": "newton"}, {"lam": -1.0}, {"lr": 0.0}])
def test_lora_fair_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        LoraFair(_NoInject(AdapterSpec()), **kwargs)


# -- through the Flower Strategy API ------------------------------------------------------------
class _AllNodes:
    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def sample(self, server_round: int) -> list[tuple[int, int]]:
        return [(i, node) for i, node in enumerate(self.nodes)]


def _round_metrics(name: str, glob: State, updates: list[ClientUpdate]) -> tuple[State, dict]:
    from fedpeft.records import from_record

    from fedpeft.federation.round import RoundStrategy
    from fedpeft.pipeline import Pipeline, layout_of

    layout = layout_of(updates[0].state)
    strategy = RoundStrategy(STRATEGIES.get(name)(_NoInject(AdapterSpec())), Pipeline([]),
                             _AllNodes(len(updates)), upload_layout=lambda rank: layout)
    config = ConfigRecord({"server-round": 1, "round-rank": 0})
    messages = list(strategy.configure_train(1, to_record(glob), config, grid=None))
    replies = [Message(RecordDict({"arrays": to_record(u.state), "metrics": MetricRecord(
        {"client-id": u.client_id, "num-examples": u.num_examples, "train-loss": 1.0})}), reply_to=m)
        for m, u in zip(messages, updates)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return from_record(arrays), dict(metrics)


def test_reported_aggregation_error_drops_versus_fedavg(flower_task_identity):
    glob, updates = _heterogeneous_clients(seed=3)
    _, m_avg = _round_metrics("fedavg", glob, updates)
    new_fair, m_fair = _round_metrics("lora-fair", glob, updates)
    assert m_fair["aggregation-error"] < 0.9 * m_avg["aggregation-error"]
    # the metric is computed on what is actually sent next round
    expected = _error(_NoInject(AdapterSpec()), glob, updates, new_fair)
    assert m_fair["aggregation-error"] == pytest.approx(expected, rel=1e-6)


def test_lora_fair_restores_the_torch_thread_setting():
    # the solves run single-threaded (tiny tensors); the server's setting must come back
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        glob, updates = _heterogeneous_clients(seed=4)
        STRATEGIES.get("lora-fair")(_NoInject(AdapterSpec()), steps=5).aggregate(glob, updates)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
