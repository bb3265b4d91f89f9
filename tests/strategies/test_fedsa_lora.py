"""``fedsa-lora`` server side (SPEC §2.4): A and head are averaged, global B is untouched,
honest uploads have no B, personalized accuracy is example-weighted. The client half is
tested in ``tests/federation/test_fedsa_client.py``."""

from __future__ import annotations

import pytest
import torch

from fedpeft.adapters.base import Adapter, AdapterSpec
from strategies import STRATEGIES
from fedpeft.strategy import ClientUpdate
from strategies.fedsa_lora import FedSaLora, is_lora_b


class _NoInject(Adapter):
    name = "test"

    def inject(self, model):  # pragma: no cover - never called
        return model


A, B = "m.query.lora_A.default.weight", "m.query.lora_B.default.weight"
HEAD = "classifier.modules_to_save.default.weight"


def _client(seed: int, n: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    state = {A: torch.randn(2, 6, generator=g), B: torch.randn(5, 2, generator=g), HEAD: torch.randn(3, 6, generator=g)}
    return ClientUpdate(node_id=seed, client_id=seed, num_examples=n, state=state, train_loss=0.0, bytes_up=0)


def test_fedsa_averages_a_and_head_and_leaves_global_b_untouched():
    glob = {A: torch.zeros(2, 6), B: torch.full((5, 2), 7.0), HEAD: torch.zeros(3, 6)}
    c1, c2 = _client(1, 1), _client(2, 3)
    out = STRATEGIES.get("fedsa-lora")(_NoInject(AdapterSpec())).aggregate(glob, [c1, c2])
    assert set(out) == set(glob)
    assert torch.equal(out[B], glob[B])  # bit-identical: B never leaves the clients' control
    for key in (A, HEAD):
        torch.testing.assert_close(out[key], 0.25 * c1.state[key] + 0.75 * c2.state[key])


def test_fedsa_differs_from_fedavg_only_in_b():
    glob = {A: torch.zeros(2, 6), B: torch.zeros(5, 2), HEAD: torch.zeros(3, 6)}
    ups = [_client(3, 2), _client(4, 5)]
    adapter = _NoInject(AdapterSpec())
    fedsa = STRATEGIES.get("fedsa-lora")(adapter).aggregate(glob, ups)
    fedavg = STRATEGIES.get("fedavg")(adapter).aggregate(glob, ups)
    changed = {k for k in glob if not torch.equal(fedsa[k], fedavg[k])}
    assert changed == {B}


def test_lora_b_key_recognition():
    assert is_lora_b(B) and not is_lora_b(A) and not is_lora_b(HEAD)
    assert not is_lora_b("m.lora_B_extra.weight")


def test_fedsa_pipeline_drops_b_from_uploads_and_from_the_honest_layout():
    from pathlib import Path

    from fedpeft.config import RunConfig
    from fedpeft.pipeline import BuildEnv, ClientContext, Pipeline

    cfg = RunConfig(strategy="fedsa-lora")
    pipeline = Pipeline.build(BuildEnv(cfg, FedSaLora, "server"))
    assert [s.name for s in pipeline.stages] == ["client-local"]
    assert pipeline.client_layout({A: (2, 6), B: (5, 2), HEAD: (3, 6)}, 7) == {A: (2, 6), HEAD: (3, 6)}
    upload = {A: torch.ones(2, 6), B: torch.ones(5, 2), HEAD: torch.ones(3, 6)}
    ctx = ClientContext(7, "7", 1, None, {}, Path("."))
    sent, _ = Pipeline.build(BuildEnv(cfg, FedSaLora, "client")).on_client(upload, ctx)
    assert set(sent) == {A, HEAD}
    assert FedSaLora.client_local(B) and not FedSaLora.client_local(A)
    # other strategies keep nothing local: no such stage in their pipeline
    fedavg = STRATEGIES.get("fedavg")
    assert Pipeline.build(BuildEnv(RunConfig(), fedavg, "client")).find("client-local") is None


def test_fedsa_personalized_accuracy_is_weighted_by_local_test_size():
    ups = [_client(1, 4), _client(2, 4), _client(3, 0)]
    ups[0].metrics = {"personalized-accuracy": 1.0, "personalized-examples": 30.0}
    ups[1].metrics = {"personalized-accuracy": 0.5, "personalized-examples": 10.0}
    ups[2].metrics = {"personalized-accuracy": 0.0, "personalized-examples": 50.0}  # no training data
    metrics = FedSaLora(_NoInject(AdapterSpec())).round_metrics(ups)
    assert metrics["personalized-accuracy"] == pytest.approx((30 * 1.0 + 10 * 0.5) / 40)
    assert "personalized-accuracy" not in FedSaLora(_NoInject(AdapterSpec())).round_metrics(ups[:0])


def test_fedsa_reports_no_aggregation_error():
    # each client keeps its own B: there is no global product B A to measure an error of
    glob = {A: torch.zeros(2, 6), B: torch.zeros(5, 2), HEAD: torch.zeros(3, 6)}
    strategy = FedSaLora(_NoInject(AdapterSpec()))
    updates = [_client(1, 1), _client(2, 3)]
    assert strategy.aggregation_error(glob, updates, strategy.aggregate(glob, updates)) is None


def test_fedsa_broadcast_leaves_out_the_constant_global_b():
    glob = {A: torch.zeros(2, 6), B: torch.zeros(5, 2), HEAD: torch.zeros(3, 6)}
    strategy = FedSaLora(_NoInject(AdapterSpec()))
    assert set(strategy.broadcast_state(glob, None)) == {A, HEAD}
