"""FLoRA (SPEC §2.4): the fold equals the weighted sum of the clients' products, clients
restart from the fresh LoRA, and end to end the aggregation error is ~0 where FedAvg's is not."""

from __future__ import annotations

import pytest
import torch

from fedpeft.adapters import AdapterSpec, build_adapter
from fedpeft.config import resolve
from fedpeft.errors import UsageError
from fedpeft.simulation import simulate
from strategies import STRATEGIES, ClientUpdate
from strategies.fedavg import FedAvg
from strategies.flora import Flora, base_key

A, B, W = "enc.q.lora_A.default.weight", "enc.q.lora_B.default.weight", "enc.q.base_layer.weight"
HEAD = "head.weight"
D_OUT, D_IN, R = 6, 5, 3


def _client(gen: torch.Generator, n: int, cid: int) -> ClientUpdate:
    state = {A: torch.randn(R, D_IN, generator=gen, dtype=torch.float64),
             B: torch.randn(D_OUT, R, generator=gen, dtype=torch.float64),
             HEAD: torch.randn(2, D_OUT, generator=gen, dtype=torch.float64)}
    return ClientUpdate(node_id=cid, client_id=cid, num_examples=n, state=state, train_loss=0.0, bytes_up=0)


@pytest.fixture
def setup():
    gen = torch.Generator().manual_seed(0)
    adapter = build_adapter("lora", AdapterSpec(rank=R, alpha=2 * R))  # scale alpha/r = 2
    initial = {A: torch.randn(R, D_IN, generator=gen, dtype=torch.float64),
               B: torch.zeros(D_OUT, R, dtype=torch.float64),
               HEAD: torch.zeros(2, D_OUT, dtype=torch.float64)}
    w0 = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64)
    updates = [_client(gen, n, i) for i, n in enumerate((10, 30, 60))]
    return adapter, initial, w0, updates


def test_base_key_names_peft_base_layer():
    assert base_key(A) == W


def test_fold_is_the_weighted_sum_of_client_products(setup):
    adapter, initial, w0, updates = setup
    flora = Flora(adapter, sampler=None)
    g = flora.initial_global(initial, {W: w0})
    assert set(g) == {A, B, HEAD, W} and torch.equal(g[W], w0)
    new = flora.aggregate(g, updates)
    p = torch.tensor([10, 30, 60], dtype=torch.float64) / 100
    expected = w0 + sum(p_i * 2.0 * (u.state[B] @ u.state[A]) for p_i, u in zip(p, updates))
    torch.testing.assert_close(new[W], expected, rtol=0, atol=1e-12)
    # clients restart from the fresh LoRA; the head is the plain weighted mean
    assert torch.equal(new[A], initial[A]) and torch.equal(new[B], initial[B])
    torch.testing.assert_close(new[HEAD], sum(p_i * u.state[HEAD] for p_i, u in zip(p, updates)))
    assert flora.aggregation_error(g, updates, new) < 1e-12


def test_flora_is_exact_where_fedavg_is_not(setup):
    adapter, initial, w0, updates = setup
    flora = Flora(adapter, sampler=None)
    g = flora.initial_global(initial, {W: w0})
    fedavg = FedAvg(adapter, sampler=None)
    avg_err = fedavg.aggregation_error(initial, updates, fedavg.aggregate(initial, updates))
    assert avg_err > 0.1
    assert flora.aggregation_error(g, updates, flora.aggregate(g, updates)) < 1e-12


def test_dylora_and_user_dp_are_refused():
    with pytest.raises(UsageError, match="dylora.*allowed adapters: lora, ffa-lora"):
        resolve({"strategy": "flora", "adapter": "dylora"})
    with pytest.raises(UsageError, match="flora needs every client's individual update"):
        resolve({"strategy": "flora", "epsilon": 2.0, "clients": 100})
    assert STRATEGIES.get("flora") is Flora


@pytest.mark.parametrize("adapter", ["lora", "ffa-lora"])
def test_flora_run_end_to_end(tmp_path, adapter):
    cfg = resolve({"backend": "inprocess", "max_client_examples": 16, "max_test_examples": 64,
                   "batch_size": 8, "clients": 4, "cohort": 4, "rounds": 2, "strategy": "flora",
                   "adapter": adapter, "partition": "dirichlet", "dirichlet_alpha": 0.3,
                   "output": str(tmp_path / "flora")})
    out = simulate(cfg, [])
    from fedpeft.federation.workspace import get_workspace

    ws = get_workspace(cfg)
    dense = sum(4 * w.numel() for w in ws.frozen_base.values())
    for r in out.rounds:
        assert r.rejected == 0 and r.eval_accuracy is not None
        # float32 storage of the folded weight is the only error left
        assert r.aggregation_error is not None and r.aggregation_error < 1e-3
        # the dense folded weights travel down to every sampled client
        assert r.bytes_down >= dense * r.clients_sampled
    # the cached model's frozen base is restored for the next run in this process
    run_again = simulate(cfg, [])
    assert [r.eval_accuracy for r in run_again.rounds] == [r.eval_accuracy for r in out.rounds]
