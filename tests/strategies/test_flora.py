"""FLoRA (SPEC §2.4): the fold equals the weighted sum of the clients' products, clients
restart from the fresh LoRA, and end to end the aggregation error is ~0 where FedAvg's is not."""

from __future__ import annotations

import pytest
import torch

from fedpeft.adapters import AdapterSpec, build_adapter
from fedpeft.settings import resolve
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
    flora = Flora(adapter)
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
    flora = Flora(adapter)
    g = flora.initial_global(initial, {W: w0})
    fedavg = FedAvg(adapter)
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
    from fedpeft.engine.workspace import get_workspace

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


def test_heterogeneous_ranks_fold_exactly_and_expect_prefix_uploads(setup):
    from pathlib import Path

    from fedpeft.config import RunConfig
    from fedpeft.pipeline import ClientContext
    from fedpeft.stages.rank_cap import RankCap

    adapter, initial, w0, updates = setup
    ranks = {0: 1, 1: 2, 2: 3}
    stage = RankCap(RunConfig(strategy="flora", client_ranks="1,2,3"))   # client i: ranks[i mod 3]
    flora = Flora(adapter)
    g = flora.initial_global(initial, {W: w0})
    full = {A: (R, D_IN), B: (D_OUT, R), HEAD: (2, D_OUT)}
    cut = []
    for u in updates:
        r = ranks[u.client_id]
        assert stage.client_layout(full, u.client_id) == {A: (r, D_IN), B: (D_OUT, r), HEAD: (2, D_OUT)}
        state, _ = stage.on_client(u.state, ClientContext(u.client_id, str(u.client_id), 1, None, {}, Path(".")))
        assert state[A].shape == (r, D_IN) and state[B].shape == (D_OUT, r)
        assert torch.equal(state[A], u.state[A][:r]) and torch.equal(state[B], u.state[B][:, :r])
        cut.append(ClientUpdate(u.node_id, u.client_id, u.num_examples, state, 0.0, 0))
    new = flora.aggregate(g, cut)
    p = torch.tensor([10, 30, 60], dtype=torch.float64) / 100
    # independent: the rank-r_i products, weighted (the fresh B is 0, so no start term)
    expected = w0 + sum(p_i * 2.0 * (c.state[B] @ c.state[A]) for p_i, c in zip(p, cut))
    torch.testing.assert_close(new[W], expected, rtol=0, atol=1e-12)
    assert flora.aggregation_error(g, cut, new) < 1e-12


def test_client_ranks_are_validated():
    with pytest.raises(UsageError, match="--client-ranks '2,9' is invalid; allowed: comma-separated integers in 1..--rank \\(8\\)"):
        resolve({"strategy": "flora", "client_ranks": "2,9"})
    with pytest.raises(UsageError, match="--client-ranks needs a strategy .* not --strategy fedavg; allowed: flora"):
        resolve({"client_ranks": "2,4"})
    assert resolve({"strategy": "flora", "client_ranks": "2, 4,8"}).client_rank(4) == 4


def _flora_cfg(tmp_path, name, **kw):
    return resolve({"backend": "inprocess", "max_client_examples": 16, "max_test_examples": 64,
                    "batch_size": 8, "clients": 4, "cohort": 4, "rounds": 1, "strategy": "flora",
                    "output": str(tmp_path / name), **kw})


def test_client_ranks_shrink_uploads_by_the_parameter_count(tmp_path):
    full = simulate(_flora_cfg(tmp_path, "r8"), [])
    mixed = simulate(_flora_cfg(tmp_path, "r28", client_ranks="2,8"), [])
    rf, rm = full.rounds[0], mixed.rounds[0]
    assert rf.clients_sampled == rm.clients_sampled == 4 and rm.rejected == 0
    # per client: head 2x384+2 floats, plus 12 adapted matrices x (A: r x 384, B: 384 x r)
    count = lambda r: 2 * 384 + 2 + 12 * 2 * r * 384  # noqa: E731
    # float32 values plus a fixed per-array overhead (26 arrays), measured on the full run
    overhead = rf.bytes_up / 4 - 4 * count(8)
    assert 0 < overhead < 26 * 1000
    expected = 2 * (4 * count(2) + overhead) + 2 * (4 * count(8) + overhead)
    assert rm.bytes_up == pytest.approx(expected, rel=1e-3)
    assert rm.aggregation_error < 1e-3


def test_a_rank_limited_client_keeps_its_extra_components_at_zero_under_dp_sgd(tmp_path):
    from fedpeft.engine.client import ClientRound, train_client
    from fedpeft.engine.workspace import get_workspace

    cfg = _flora_cfg(tmp_path, "dp", client_ranks="3", dp="sample", noise_multiplier=1.0)
    ws = get_workspace(cfg)
    out = train_client(ws, cfg, ClientRound(client_id=1, num_partitions=4, server_round=1, round_rank=None),
                       dict(ws.initial_state), tmp_path / "state")
    trained = {n: p.detach() for n, p in ws.model.named_parameters() if p.requires_grad}
    a = [t for n, t in trained.items() if ".lora_A." in n]
    b = [t for n, t in trained.items() if ".lora_B." in n]
    assert all(bool((t[3:] == 0).all()) and bool((t[:3] != 0).any()) for t in a)
    assert all(bool((t[:, 3:] == 0).all()) for t in b) and any(bool((t[:, :3] != 0).any()) for t in b)
    assert all(v.shape[0] == 3 for k, v in out.upload.items() if ".lora_A." in k)
