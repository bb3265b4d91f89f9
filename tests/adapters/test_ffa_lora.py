"""FFA-LoRA (SPEC §1.2) against LoRA (SPEC §1.1): frozen shared A, half the upload, and an
aggregation error of 0 vs > 0 — each checked against a plain-torch computation."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.adapters import AdapterSpec, State, build_adapter
from fedpeft.config import RunConfig
from fedpeft.engine.client import ClientRound, train_client
from fedpeft.federation.round import RoundStrategy
from fedpeft.layout import honest_upload_layout
from fedpeft.pipeline import Pipeline
from fedpeft.records import from_record, payload_bytes, to_record
from fedpeft.engine.workspace import Workspace, frozen_fingerprint, get_workspace
from fedpeft.model.loading import load_classifier
from strategies import STRATEGIES

MODEL = "embedded:all-MiniLM-L6-v2"
NUM_PARTITIONS = 20
# non-IID clients: Dirichlet(0.1) label skew, two local steps each. (After ONE step from B = 0
# LoRA is still exact: A gets no gradient while B = 0, so every A_i equals the global A.)
CLIENT_CFG = RunConfig(max_test_examples=64, seed=0, partition="dirichlet", dirichlet_alpha=0.1,
                       max_client_examples=32, batch_size=16, lr=1e-2)
#: per-client state of these plain (non-private, uncompressed) rounds: nothing is kept, but the
#: client code path takes a directory; never the working directory
STATE_DIR = Path(tempfile.mkdtemp(prefix="fedpeft-ffa-test-"))

_A_HASH_SCRIPT = """
import hashlib, torch
from fedpeft.adapters import AdapterSpec, build_adapter
from fedpeft.model.loading import load_classifier
adapter = build_adapter("ffa-lora", AdapterSpec(seed=0))
model = adapter.inject(load_classifier("embedded:all-MiniLM-L6-v2", 2, seed=0))
h = hashlib.sha256()
for n, p in sorted(model.named_parameters()):
    if ".lora_A." in n:
        h.update(n.encode()); h.update(p.detach().numpy().tobytes())
print(h.hexdigest())
"""


def a_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for n, p in sorted(model.named_parameters()):
        if ".lora_A." in n:
            h.update(n.encode())
            h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def lora_ws() -> Workspace:
    return get_workspace(RunConfig(max_test_examples=64, seed=0))  # same key as other test modules


@pytest.fixture(scope="module")
def ffa_ws(lora_ws) -> Workspace:
    """An FFA-LoRA workspace sharing the LoRA one's tokenised data (its own model and adapter)."""
    adapter = build_adapter("ffa-lora", AdapterSpec(seed=0))
    model = adapter.inject(load_classifier(MODEL, lora_ws.splits.num_labels, seed=0))
    model.eval()
    return dataclasses.replace(lora_ws, adapter=adapter, model=model,
                               initial_state=adapter.trainable_state(model))


@pytest.fixture(scope="module")
def clients(lora_ws) -> list[int]:
    parts = lora_ws.partitions(CLIENT_CFG.partition, NUM_PARTITIONS, CLIENT_CFG.dirichlet_alpha, 0)
    ids = [i for i in range(NUM_PARTITIONS) if len(parts.indices(i)) >= 16]
    return ids[:3]


class _AllNodes:
    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def sample(self, server_round: int) -> list[tuple[int, int]]:
        return [(i, node) for i, node in enumerate(self.nodes)]


def federated_round(ws: Workspace, global_state: State, client_ids: list[int],
                    server_round: int) -> tuple[State, dict[str, float], list[State], list[int]]:
    """One FedAvg round through the real strategy code path (configure -> clients -> aggregate)."""
    strategy = RoundStrategy(STRATEGIES.get("fedavg")(ws.adapter), Pipeline([]), _AllNodes(len(client_ids)),
                             upload_layout=honest_upload_layout(ws.adapter, ws.model))
    config = ConfigRecord({"server-round": server_round, "round-rank": 0})
    messages = list(strategy.configure_train(server_round, to_record(global_state), config, grid=None))
    replies, uploads, examples = [], [], []
    for msg, cid in zip(messages, client_ids):
        rnd = ClientRound(client_id=cid, num_partitions=NUM_PARTITIONS, server_round=server_round,
                          round_rank=None)
        out = train_client(ws, CLIENT_CFG, rnd, from_record(msg.content["arrays"]), STATE_DIR)
        upload, result = out.upload, out.result
        uploads.append(upload)
        examples.append(result.examples)
        metrics = MetricRecord({"client-id": cid, "num-examples": result.examples, "train-loss": result.mean_loss})
        replies.append(Message(RecordDict({"arrays": to_record(upload), "metrics": metrics}), reply_to=msg))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return from_record(arrays), dict(metrics), uploads, examples


def lora_layers(state: State) -> list[str]:
    return sorted(k[: -len(".lora_B.default.weight")] for k in state if k.endswith(".lora_B.default.weight"))


# -- FFA-LoRA structure ------------------------------------------------------------------------
def test_ffa_trains_and_uploads_b_and_head_but_never_a(ffa_ws):
    names = {n: p.requires_grad for n, p in ffa_ws.model.named_parameters()}
    assert all(not g for n, g in names.items() if ".lora_A." in n)
    assert all(g for n, g in names.items() if ".lora_B." in n)
    up = ffa_ws.adapter.upload(ffa_ws.model, None)
    assert not any(".lora_A." in k for k in up)
    assert sum(".lora_B." in k for k in up) == 12 and any("classifier" in k for k in up)


def test_ffa_upload_is_half_of_lora_for_the_adapter(lora_ws, ffa_ws):
    lora_up = lora_ws.adapter.upload(lora_ws.model, None)
    ffa_up = ffa_ws.adapter.upload(ffa_ws.model, None)
    # hand count for r = 8 on 6 layers x {query, value} of a 384-wide model: A and B are 8 x 384
    lora_adapter = sum(v.numel() for k, v in lora_up.items() if ".lora_" in k)
    ffa_adapter = sum(v.numel() for k, v in ffa_up.items() if ".lora_" in k)
    assert lora_adapter == 12 * 2 * 8 * 384 and ffa_adapter == 12 * 8 * 384
    ratio = payload_bytes(to_record(ffa_up)) / payload_bytes(to_record(lora_up))
    assert 0.5 < ratio < 0.52  # the head (384 x 2 + 2) is uploaded by both


def test_ffa_frozen_a_is_bit_identical_in_an_independent_process(ffa_ws):
    out = subprocess.run([sys.executable, "-c", _A_HASH_SCRIPT], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == a_hash(ffa_ws.model)


def test_ffa_shared_a_is_what_the_server_adds_for_products(ffa_ws):
    full = ffa_ws.adapter.with_frozen_factors(ffa_ws.initial_state)
    params = dict(ffa_ws.model.named_parameters())
    a_keys = [k for k in full if ".lora_A." in k]
    assert len(a_keys) == 12 and all(torch.equal(full[k], params[k]) for k in a_keys)


# -- aggregation error through the FedAvg code path --------------------------------------------
def test_ffa_aggregation_error_is_zero_over_rounds_and_a_and_base_never_change(ffa_ws, clients,
                                                                               flower_task_identity):
    ws = ffa_ws
    base_before = frozen_fingerprint(ws.model)  # includes the frozen A
    hash_before = a_hash(ws.model)
    params = dict(ws.model.named_parameters())
    global_state = ws.initial_state
    for server_round in (1, 2):
        new_global, metrics, uploads, examples = federated_round(ws, global_state, clients[:2],
                                                                 server_round)
        assert metrics["aggregation-error"] <= 1e-6
        # independent: ‖Σ p_i B_i A − B̄ A‖ / ‖Σ p_i B_i A‖ with A read from the model
        p = torch.tensor(examples, dtype=torch.float64) / sum(examples)
        for layer in lora_layers(new_global):
            a = params[f"{layer}.lora_A.default.weight"].detach().double()
            bs = [u[f"{layer}.lora_B.default.weight"].double() for u in uploads]
            ideal = sum(p_i * (b_i @ a) for p_i, b_i in zip(p, bs))
            sent = new_global[f"{layer}.lora_B.default.weight"].double() @ a
            assert float(torch.linalg.matrix_norm(ideal)) > 0  # B really trained
            assert float(torch.linalg.matrix_norm(ideal - sent) / torch.linalg.matrix_norm(ideal)) <= 1e-6
        global_state = new_global
    base_after = frozen_fingerprint(ws.model)
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert a_hash(ws.model) == hash_before


def test_lora_aggregation_error_is_positive_and_matches_the_pairwise_identity(lora_ws, clients,
                                                                              flower_task_identity):
    ws = lora_ws
    base_before = frozen_fingerprint(ws.model)
    try:
        new_global, metrics, uploads, examples = federated_round(ws, ws.initial_state, clients, 1)
    finally:
        after = frozen_fingerprint(ws.model)
        ws.adapter.load_state(ws.model, ws.initial_state)  # the workspace is shared across modules
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)
    assert all(any(".lora_A." in k for k in u) for u in uploads)
    # independent: Σ p_i B_i A_i − B̄Ā = ½ Σ_i Σ_j p_i p_j (B_i − B_j)(A_i − A_j)   (SPEC §1.1)
    p = [n / sum(examples) for n in examples]
    errors = []
    for layer in lora_layers(new_global):
        A = [u[f"{layer}.lora_A.default.weight"].double() for u in uploads]
        B = [u[f"{layer}.lora_B.default.weight"].double() for u in uploads]
        gap = 0.5 * sum(p[i] * p[j] * (B[i] - B[j]) @ (A[i] - A[j])
                        for i in range(len(p)) for j in range(len(p)))
        ideal = sum(p_i * b @ a for p_i, a, b in zip(p, A, B))
        errors.append(float(torch.linalg.matrix_norm(gap) / torch.linalg.matrix_norm(ideal)))
    expected = sum(errors) / len(errors)
    assert metrics["aggregation-error"] > 1e-3
    assert metrics["aggregation-error"] == pytest.approx(expected, rel=1e-6)
