"""Sample-level DP-SGD on each client (SPEC §3.2): Opacus per-example gradients on the
trainable adapter/head only, a bit-identical frozen base, and a per-client accountant that
persists on disk across every round the client trains in.

Runs on the real embedded model (one cached workspace) with a few dozen examples per client.
Every expectation is computed independently: autograd's batch gradient, a fresh Opacus
``RDPAccountant`` stepped one step at a time, Google's ``dp-accounting`` RDP accountant.
"""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant as GoogleRdp
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

from fedpeft.config import RunConfig
from fedpeft.data.tokenized import collate
from fedpeft.errors import UsageError
from fedpeft.engine.client import TRAINING_MODES, ClientRound, LocalTask, train_client
from fedpeft.records import to_record
from fedpeft.engine.workspace import frozen_fingerprint, get_workspace
from fedpeft.privacy.accounting import RDP_ORDERS, make_accountant
from fedpeft.privacy.client_accounting import ClientAccountantStore, client_noise_plan
from fedpeft.training.dp_sgd import grad_sample_module, train_local_dp

#: Message() outside a Flower runtime needs a task identity (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("flower_task_identity")

N_EXAMPLES, BATCH = 12, 4  # q = 1/3, ceil(12/4) = 3 noisy steps per round
DELTA = 1e-5
CFG = RunConfig(clients=50, cohort=5, rounds=2, batch_size=BATCH, max_client_examples=N_EXAMPLES,
                max_length=32, max_test_examples=64, dp="sample", noise_multiplier=1.0, sample_clip=1.0, seed=0)


@pytest.fixture(scope="module")
def ws():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a simulated client runs (cpus_per_client = 1); fast on a busy box
    yield get_workspace(CFG)
    torch.set_num_threads(threads)


def client_round(cid: int, server_round: int) -> ClientRound:
    return ClientRound(client_id=cid, num_partitions=CFG.clients, server_round=server_round,
                       round_rank=None, dp_delta=DELTA)


def opacus_epsilon(events: list[tuple[float, float, int]], delta: float) -> float:
    """A fresh Opacus RDP accountant stepped one mechanism at a time (its own merge logic)."""
    acc = RDPAccountant()
    for z, q, n in events:
        for _ in range(n):
            acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS))


def google_epsilon(events: list[tuple[float, float, int]], delta: float) -> float:
    acc = GoogleRdp(orders=list(RDP_ORDERS))
    for z, q, n in events:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
    return acc.get_epsilon(delta)


def forward_hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


# -- Opacus sees only the trainable adapter/head --------------------------------------------
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_grads_exist_only_on_trainable_adapter_and_head_and_sum_to_batch_grad(ws):
    model = ws.model
    rows = np.arange(4)
    batch = collate(ws.train, rows, ws.pad_id)
    gsm = grad_sample_module(model)
    gsm.enable_hooks()
    gsm.train()
    try:
        out = gsm(**batch)
        out.loss.backward()
        with_gs = {n for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        # independent expectation from the names: LoRA factors + the classifier copy peft trains
        named = {n for n, _ in model.named_parameters()
                 if ".lora_A." in n or ".lora_B." in n or ("classifier" in n and "modules_to_save" in n)}
        assert with_gs == trainable == named
        assert len(with_gs) == 26  # 6 layers x {query, value} x {A, B} + head weight, bias
        for n, p in model.named_parameters():
            if n in with_gs:
                assert p.grad_sample.shape == (len(rows), *p.shape)
                # loss is a batch mean: autograd's batch gradient = mean of per-example grads
                torch.testing.assert_close(p.grad_sample.mean(0), p.grad, rtol=1e-4, atol=1e-6)
            else:
                assert getattr(p, "grad_sample", None) is None and p.grad is None
    finally:
        gsm.disable_hooks()
        gsm.zero_grad(set_to_none=True)
        for m in model.modules():
            m.__dict__.pop("activations", None)
            m.__dict__.pop("max_batch_len", None)
        model.eval()


# -- the frozen base never moves --------------------------------------------------------------
def test_frozen_base_bit_identical_and_adapter_moves_after_dp_training(ws, tmp_path):
    before = frozen_fingerprint(ws.model)
    broadcast = ws.initial_state
    out = train_client(ws, CFG, client_round(0, 1), broadcast, tmp_path)
    after = dict(ws.model.named_parameters())
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    assert set(out.upload) == {n for n, p in ws.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(out.upload[k], broadcast[k]) for k in out.upload)
    assert out.metrics["dp-steps"] == math.ceil(N_EXAMPLES / BATCH) == out.result.steps


# -- ε composes over a client's rounds, and matches independent accountants -----------------------
def test_client_epsilon_composes_over_rounds_and_matches_independent_accountants(ws, tmp_path):
    q, per_round = BATCH / N_EXAMPLES, math.ceil(N_EXAMPLES / BATCH)
    r1 = train_client(ws, CFG, client_round(3, 1), ws.initial_state, tmp_path)
    r2 = train_client(ws, CFG, client_round(3, 2), r1.upload, tmp_path)
    eps1, eps2 = r1.metrics["epsilon"], r2.metrics["epsilon"]
    assert r1.metrics["noise-multiplier"] == r2.metrics["noise-multiplier"] == 1.0
    assert eps2 > eps1 > 0
    for rounds, eps in ((1, eps1), (2, eps2)):
        events = [(1.0, q, per_round * rounds)]
        assert eps == pytest.approx(opacus_epsilon(events, DELTA), rel=1e-9)
        # different numerics for fractional orders at this large q (dp-accounting drops the
        # ones its series does not converge for): agreement to 1e-3, not bit for bit
        assert eps == pytest.approx(google_epsilon(events, DELTA), rel=1e-3)
    # another client's history is its own
    other = train_client(ws, CFG, client_round(4, 2), ws.initial_state, tmp_path)
    assert other.metrics["epsilon"] == pytest.approx(eps1, rel=1e-12)


def test_accountant_file_survives_a_fresh_store_and_is_written_atomically(ws, tmp_path):
    train_client(ws, CFG, client_round(5, 1), ws.initial_state, tmp_path)
    path = tmp_path / "accountants" / "5.json"
    state = json.loads(path.read_text())
    assert state == {"accountant": "rdp", "history": [[1.0, BATCH / N_EXAMPLES, 3]]}
    assert [p.name for p in path.parent.iterdir()] == ["5.json"]  # no temporary left behind
    fresh = ClientAccountantStore(tmp_path / "accountants", "rdp").load(5)
    assert fresh.history == [(1.0, BATCH / N_EXAMPLES, 3)]
    assert fresh.epsilon(DELTA) == pytest.approx(opacus_epsilon(fresh.history, DELTA), rel=1e-12)
    assert ClientAccountantStore(tmp_path / "accountants", "rdp").load(6).steps == 0
    with pytest.raises(ValueError):
        ClientAccountantStore(tmp_path / "accountants", "prv").load(5)  # wrong accountant kind


# -- per-client calibration --------------------------------------------------------------------
@pytest.mark.parametrize("n", [12, 200])
def test_per_client_calibration_keeps_worst_case_epsilon_within_target(n):
    target, rounds, epochs = 6.0, 5, 2
    plan = client_noise_plan(n, BATCH, epochs, rounds, delta=DELTA, epsilon=target)
    q, steps = BATCH / n, rounds * epochs * math.ceil(n / BATCH)
    assert plan.sample_rate == q and plan.steps_per_round == epochs * math.ceil(n / BATCH)
    events = [(plan.noise_multiplier, q, steps)]  # sampled in every round: the worst case
    eps = google_epsilon(events, DELTA)
    assert eps <= target + 1e-9
    assert eps > target - 0.05  # calibrated, not merely "a lot of noise"
    # slightly less noise would break the target: the z is (near) minimal
    assert google_epsilon([(plan.noise_multiplier * 0.97, q, steps)], DELTA) > target


def test_calibrated_client_refuses_a_round_past_its_target(ws, tmp_path):
    cfg = RunConfig(**{**CFG.to_dict(), "noise_multiplier": None, "epsilon": 8.0, "rounds": 1})
    out = train_client(ws, cfg, client_round(7, 1), ws.initial_state, tmp_path)
    plan = client_noise_plan(N_EXAMPLES, BATCH, 1, 1, delta=DELTA, epsilon=8.0)
    assert out.metrics["noise-multiplier"] == plan.noise_multiplier
    assert out.metrics["epsilon"] <= 8.0
    with pytest.raises(UsageError, match="past --epsilon"):  # a second round would exceed it
        train_client(ws, cfg, client_round(7, 2), out.upload, tmp_path)
    assert ClientAccountantStore(tmp_path / "accountants").load(7).steps == 3  # nothing spent


def test_delta_not_below_one_over_n_is_refused_before_training(ws, tmp_path):
    bad = ClientRound(client_id=8, num_partitions=CFG.clients, server_round=1, round_rank=None,
                      dp_delta=1 / N_EXAMPLES)
    with pytest.raises(UsageError, match="delta"):
        train_client(ws, CFG, bad, ws.initial_state, tmp_path)
    assert not (tmp_path / "accountants" / "8.json").exists()


# -- Opacus plumbing: empty batches, hooks, a worker that also trains without DP ------------------
def test_empty_poisson_batch_is_a_noise_only_step_and_is_accounted(ws):
    ws.adapter.load_state(ws.model, ws.initial_state)
    acc = make_accountant("rdp")
    res = train_local_dp(ws.model, [[None]], lr=1e-2, noise_multiplier=1.0, sample_clip=1.0,
                         sample_rate=0.1, expected_batch_size=8.0, accountant=acc,
                         generator=torch.Generator().manual_seed(0))
    assert res.steps == 1 and res.examples == 0
    assert acc.history == [(1.0, 0.1, 1)]
    moved = ws.adapter.trainable_state(ws.model)
    assert all(not torch.equal(moved[k], ws.initial_state[k]) for k in moved)


def test_no_hook_leak_over_many_clients_and_plain_training_afterwards_is_untouched(ws, tmp_path):
    train_client(ws, CFG, client_round(9, 1), ws.initial_state, tmp_path)  # wraps (if not yet)
    hooks = forward_hook_count(ws.model)
    for cid in range(10, 12):
        train_client(ws, CFG, client_round(cid, 1), ws.initial_state, tmp_path)
    assert forward_hook_count(ws.model) == hooks
    # the same cached model then trains without DP: Opacus is unwrapped and stays silent
    plain = RunConfig(**{**CFG.to_dict(), "dp": "none", "noise_multiplier": None})
    seen = []
    hook = lambda step: lambda: seen.append([getattr(p, "grad_sample", None) for p in ws.model.parameters()])
    task = LocalTask(ws, plain, client_round(13, 1), np.arange(8), np.random.default_rng(0), hook, tmp_path)
    TRAINING_MODES.get("none")(task)
    assert seen and all(g is None for g in seen[0])
    assert forward_hook_count(ws.model) == 0  # LoRA adds no hooks of its own
    assert not hasattr(ws.model, "autograd_grad_sample_hooks")
    assert not any("activations" in m.__dict__ for m in ws.model.modules())
    train_client(ws, CFG, client_round(14, 1), ws.initial_state, tmp_path)  # and DP again
    assert forward_hook_count(ws.model) == hooks


# -- the ClientApp reply carries the privacy metrics ------------------------------------------------
def test_client_app_reply_has_epsilon_noise_multiplier_and_steps(ws, tmp_path):
    from fedpeft.federation.client_app import train

    config = ConfigRecord({**CFG.to_client_flat(), "server-round": 1, "round-rank": 0, "dp-delta": DELTA})
    msg = Message(RecordDict({"arrays": to_record(ws.initial_state), "config": config}),
                  dst_node_id=0, message_type="train")
    ctx = Context(run_id=1, node_id=0, node_config={"partition-id": 2, "num-partitions": CFG.clients,
                                                    "state-dir": str(tmp_path)},
                  state=RecordDict(), run_config={})
    reply = train(msg, ctx)
    metrics = dict(reply.content["metrics"])
    steps = math.ceil(N_EXAMPLES / BATCH)
    assert metrics["dp-steps"] == steps and metrics["noise-multiplier"] == 1.0
    assert metrics["dp-sample-rate"] == BATCH / N_EXAMPLES and metrics["dp-delta"] == DELTA
    assert metrics["epsilon"] == pytest.approx(opacus_epsilon([(1.0, BATCH / N_EXAMPLES, steps)], DELTA))
    assert (tmp_path / "accountants" / "2.json").is_file()
