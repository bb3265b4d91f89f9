"""FedSA-LoRA's client half (SPEC §2.4; Guo et al. 2025): each client keeps its own LoRA ``B``
between the rounds it is sampled in, never uploads it, and evaluates its personalized model on
a local test set with its own label mix. Runs on the real embedded model; expectations are
computed independently (tensor sizes, label counts, the broadcast that was sent)."""

from __future__ import annotations

import dataclasses
import io
import json
from itertools import combinations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedpeft.config import RunConfig
from fedpeft.settings import resolve
from fedpeft.engine import client as client_mod
from fedpeft.data.tokenized import collate
from fedpeft.engine.client import ClientRound, train_client, train_plain
from fedpeft.stages.client_local import LOCAL_PARAMS_DIR, LocalParamStore, local_test_seed
from fedpeft.records import payload_bytes, to_record
from fedpeft.federation.round import RoundStrategy
from fedpeft.layout import check_update, honest_upload_layout
from fedpeft.pipeline import BuildEnv, Pipeline
from fedpeft.engine.workspace import get_workspace
from fedpeft.errors import UsageError
from fedpeft.privacy.publication import DIAGNOSTICS_FILE
from fedpeft.results import ResultsWriter
from fedpeft.simulation import simulate
from fedpeft.training.personal_eval import LOCAL_TEST_SIZE, label_quota, local_test_rows
from strategies.fedsa_lora import FedSaLora, is_lora_b

CFG = RunConfig(strategy="fedsa-lora", clients=8, cohort=2, rounds=3, batch_size=8, max_client_examples=16,
                max_test_examples=64, partition="dirichlet", dirichlet_alpha=0.3, seed=0)


@pytest.fixture(scope="module")
def ws():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield get_workspace(CFG)
    torch.set_num_threads(threads)


def _round(cid: int, server_round: int) -> ClientRound:
    return ClientRound(client_id=cid, num_partitions=CFG.clients, server_round=server_round, round_rank=None)


def _b_keys(state) -> list[str]:
    return sorted(k for k in state if is_lora_b(k))


def _npy_bytes(key: str, t: torch.Tensor) -> int:
    """What Flower ships for one tensor: its .npy buffer plus the key name."""
    buf = io.BytesIO()
    np.save(buf, t.numpy(), allow_pickle=False)
    return len(buf.getvalue()) + len(key.encode())


def _clients_with_rows(ws, count: int) -> list[int]:
    parts = ws.partitions(CFG.partition, CFG.clients, CFG.dirichlet_alpha, CFG.seed)
    return [c for c in range(CFG.clients) if len(parts.indices(c)) > 0][:count]


def _spy_start(monkeypatch, ws) -> list[dict[str, torch.Tensor]]:
    """Record the trainable state each local training starts from."""
    starts: list[dict[str, torch.Tensor]] = []

    def spy(task):
        starts.append(ws.adapter.trainable_state(ws.model))
        return train_plain(task)

    monkeypatch.setitem(client_mod.TRAINING_MODES._items, "none", spy)
    return starts


def _saved_keys(store: LocalParamStore) -> list[str]:
    """Clients with a local-parameter file (visible ones; a temp file starts with '.')."""
    return sorted(p.stem for p in store.directory.glob("*.safetensors") if not p.name.startswith("."))


def _local_test_set(ws, cfg: RunConfig, cid: int) -> np.ndarray:
    """Client ``cid``'s local test rows: test rows in the label mix of the rows it trains on,
    drawn from the run seed and the client (never the round)."""
    parts = ws.partitions(cfg.partition, cfg.clients, cfg.dirichlet_alpha, cfg.seed)
    rows = parts.indices(cid)[: cfg.max_client_examples or None]
    rnd = ClientRound(client_id=cid, num_partitions=cfg.clients, server_round=1, round_rank=None)
    return local_test_rows(ws.train.labels[rows], ws.test.labels, LOCAL_TEST_SIZE,
                           np.random.default_rng(local_test_seed(cfg.seed, rnd.key)))


@torch.inference_mode()
def _right_one_at_a_time(ws, rows: np.ndarray) -> int:
    """How many of ``rows`` the model as it is now classifies right, scored by hand: one
    example per forward pass (no batching, no padding), against the split's label."""
    ws.model.eval()
    right = 0
    for row in rows:
        batch = collate(ws.test, np.array([row]), ws.pad_id)
        batch.pop("labels")
        right += int(ws.model(**batch).logits.argmax(-1)) == int(ws.test.labels[row])
    return right


def _other_global(ws, seed: int) -> dict[str, torch.Tensor]:
    """A server global after some rounds: A and head moved, B at its initial value."""
    g = torch.Generator().manual_seed(seed)
    return {k: v if is_lora_b(k) else v + 0.01 * torch.randn(v.shape, generator=g)
            for k, v in ws.initial_state.items()}


def test_each_client_resumes_from_its_own_b_with_the_broadcast_a_and_head(ws, tmp_path, monkeypatch):
    starts = _spy_start(monkeypatch, ws)
    c1, c2 = _clients_with_rows(ws, 2)
    initial = ws.initial_state
    b_keys = _b_keys(initial)
    assert b_keys and all(torch.count_nonzero(initial[k]) == 0 for k in b_keys)  # peft: B = 0

    train_client(ws, CFG, _round(c1, 1), initial, tmp_path)
    train_client(ws, CFG, _round(c2, 1), initial, tmp_path)
    store = LocalParamStore(tmp_path / LOCAL_PARAMS_DIR)
    assert _saved_keys(store) == sorted([str(c1), str(c2)])  # compact: only sampled clients
    saved1 = load_file(store.path(str(c1)))
    saved2 = load_file(store.path(str(c2)))
    assert sorted(saved1) == b_keys  # only B is kept locally
    # first participation starts from the initial B, although the worker's model held c1's B
    assert all(torch.equal(starts[1][k], initial[k]) for k in b_keys)
    # both trained their B, and differently
    assert all(not torch.equal(saved1[k], initial[k]) for k in b_keys)
    assert any(not torch.equal(saved1[k], saved2[k]) for k in b_keys)

    broadcast = _other_global(ws, 5)
    out = train_client(ws, CFG, _round(c1, 3), broadcast, tmp_path)
    start = starts[2]
    for key in initial:  # B from c1's own file, everything else from the broadcast
        torch.testing.assert_close(start[key], saved1[key] if is_lora_b(key) else broadcast[key],
                                   rtol=0, atol=0)
    resaved = load_file(store.path(str(c1)))
    assert all(not torch.equal(resaved[k], saved1[k]) for k in b_keys)  # it trained on
    # after the round the model holds the personalized state: broadcast A/head + own new B
    now = ws.adapter.trainable_state(ws.model)
    assert all(torch.equal(now[k], resaved[k] if is_lora_b(k) else broadcast[k]) for k in initial)
    # the personalized evaluation is that model on c1's local test set, scored by hand here
    local_rows = _local_test_set(ws, CFG, c1)
    n = len(local_rows)
    assert out.metrics["personalized-examples"] == n > 0
    assert out.metrics["personalized-accuracy"] == pytest.approx(_right_one_at_a_time(ws, local_rows) / n,
                                                                 rel=0, abs=1e-12)
    # the baseline: always answering the most frequent label of that local test set
    majority = np.bincount(ws.test.labels[local_rows]).max() / n
    assert out.metrics["personalized-majority"] == pytest.approx(majority, rel=0, abs=1e-12)


def test_upload_has_no_b_and_its_bytes_are_the_shared_tensors_only(ws, tmp_path):
    (cid,) = _clients_with_rows(ws, 1)
    out = train_client(ws, CFG, _round(cid, 1), ws.initial_state, tmp_path)
    shared = {k: v for k, v in ws.initial_state.items() if not is_lora_b(k)}
    assert set(out.upload) == set(shared) and not _b_keys(out.upload)
    expected = sum(_npy_bytes(k, v) for k, v in shared.items())
    full = sum(_npy_bytes(k, v) for k, v in ws.initial_state.items())
    assert payload_bytes(to_record(out.upload)) == expected < full


def test_fedavg_clients_upload_b_and_keep_no_local_state(ws, tmp_path):
    (cid,) = _clients_with_rows(ws, 1)
    cfg = dataclasses.replace(CFG, strategy="fedavg")
    out = train_client(ws, cfg, _round(cid, 1), ws.initial_state, tmp_path)
    assert set(out.upload) == set(ws.initial_state)
    assert "personalized-accuracy" not in out.metrics
    assert not (tmp_path / LOCAL_PARAMS_DIR).exists()


def _server_round(ws, cfg, privacy=None) -> RoundStrategy:
    """The round strategy server.py builds for ``cfg`` (FedSA-LoRA behind its pipeline)."""
    pipeline = Pipeline.build(BuildEnv(cfg, FedSaLora, "server", privacy))
    return RoundStrategy(FedSaLora(ws.adapter), pipeline, sampler=None,
                         upload_layout=honest_upload_layout(ws.adapter, ws.model))


def test_server_layouts_exclude_b_so_a_b_upload_is_rejected(ws):
    expected = _server_round(ws, CFG).expected_layout(client_id=3)
    assert set(expected) == {k for k in ws.initial_state if not is_lora_b(k)}
    shared = {k: v for k, v in ws.initial_state.items() if not is_lora_b(k)}
    assert check_update(shared, expected) is None
    assert "unexpected keys" in check_update(dict(ws.initial_state), expected)


def test_user_level_dp_clips_and_noises_only_the_shared_coordinates(ws):
    from fedpeft.engine.privacy_plan import UserLevel
    from fedpeft.pipeline import ServerContext

    cfg = dataclasses.replace(CFG, dp="user", noise_multiplier=1.0)
    privacy = UserLevel(cfg, ws, 0.25)
    privacy.choose_streams()
    rs = _server_round(ws, cfg, privacy)
    assert [s.name for s in rs.pipeline.stages] == ["client-local", "user-dp"]
    ctx = ServerContext(1, None, dict(ws.initial_state), rs.shared_layout(None))
    (pseudo,), metrics = rs.pipeline.on_server([], ctx)   # nobody replied: noise only
    shared = {k for k in ws.initial_state if not is_lora_b(k)}
    assert set(pseudo.state) == shared
    assert all(not torch.equal(pseudo.state[k], ws.initial_state[k]) for k in shared)
    assert metrics["epsilon"] > 0


def test_stale_local_params_from_a_later_round_are_refused(ws, tmp_path):
    (cid,) = _clients_with_rows(ws, 1)
    train_client(ws, CFG, _round(cid, 2), ws.initial_state, tmp_path)
    with pytest.raises(UsageError, match="stale client state"):
        train_client(ws, CFG, _round(cid, 1), ws.initial_state, tmp_path)


# -- the local test set -----------------------------------------------------------------------
def test_label_quota_is_largest_remainder_rounding():
    train = np.array([0] * 7 + [1] * 2 + [2] * 1)  # 70 / 20 / 10 %
    assert label_quota(train, 64, 4).tolist() == [45, 13, 6, 0]  # 44.8, 12.8, 6.4 -> +1 to .8s
    q = label_quota(np.array([0, 1, 2]), 10, 3)
    assert q.sum() == 10 and np.abs(q - 10 / 3).max() < 1


def test_local_test_set_follows_train_label_proportions_and_is_deterministic():
    rng = np.random.default_rng(0)
    test_labels = rng.integers(0, 4, size=1000)
    train = np.array([0] * 30 + [1] * 5 + [3] * 15)
    rows = local_test_rows(train, test_labels, 64, np.random.default_rng([1, 2]))
    assert len(rows) == 64 and len(set(rows.tolist())) == 64
    counts = np.bincount(test_labels[rows], minlength=4)
    p = np.bincount(train, minlength=4) / len(train)
    assert np.abs(counts - p * 64).max() < 1 and counts[2] == 0
    again = local_test_rows(train, test_labels, 64, np.random.default_rng([1, 2]))
    assert np.array_equal(rows, again)
    assert not np.array_equal(rows, local_test_rows(train, test_labels, 64, np.random.default_rng([1, 3])))


def test_a_label_short_in_the_test_split_contributes_what_it_has():
    test_labels = np.array([0] * 5 + [1] * 100)
    rows = local_test_rows(np.array([0] * 50 + [1] * 50), test_labels, 40, np.random.default_rng(0))
    assert np.bincount(test_labels[rows]).tolist() == [5, 20]  # 20 zeros wanted, 5 exist


def test_real_clients_local_test_sets_match_their_train_mix(ws):
    parts = ws.partitions(CFG.partition, CFG.clients, CFG.dirichlet_alpha, CFG.seed)
    for cid in _clients_with_rows(ws, 3):
        train_labels = ws.train.labels[parts.indices(cid)[: CFG.max_client_examples]]
        rows = local_test_rows(train_labels, ws.test.labels, 32, np.random.default_rng([0, cid]))
        counts = np.bincount(ws.test.labels[rows], minlength=ws.splits.num_labels)
        available = np.bincount(ws.test.labels, minlength=ws.splits.num_labels)
        want = np.bincount(train_labels, minlength=ws.splits.num_labels) / len(train_labels) * 32
        for c in range(ws.splits.num_labels):
            assert counts[c] == available[c] if available[c] < np.ceil(want[c]) else abs(counts[c] - want[c]) < 1


# -- whole runs ---------------------------------------------------------------------------------
TINY = dict(backend="inprocess", strategy="fedsa-lora", clients=4, cohort=4, rounds=2,
            max_client_examples=16, max_test_examples=64, batch_size=8, partition="dirichlet",
            dirichlet_alpha=0.5)


def _run(tmp_path, name, **kw):
    cfg = resolve({**TINY, **kw, "output": str(tmp_path / name)})
    out = simulate(cfg, [ResultsWriter(cfg.output)])
    return cfg, out, json.loads((tmp_path / name / "results.json").read_text())


def _assert_personalized(cfg: RunConfig, results: dict) -> None:
    """A round's personalized numbers are means over its cohort's local test sets weighted by
    their sizes. Computed here by hand from the data alone: the majority baseline exactly (for
    every cohort of the round's size, when the sampling is secret), and the accuracy is a
    count of right answers over the same examples (a multiple of 1/N)."""
    ws = get_workspace(cfg)
    parts = ws.partitions(cfg.partition, cfg.clients, cfg.dirichlet_alpha, cfg.seed)
    sizes, majorities = {}, {}  # clients with rows to train on: local test size, majority count
    for cid in range(cfg.clients):
        if len(parts.indices(cid)):
            labels = ws.test.labels[_local_test_set(ws, cfg, cid)]
            sizes[cid], majorities[cid] = len(labels), int(np.bincount(labels).max())
    for r in results["rounds"]:
        assert r["rejected"] == 0 and r["rejections"] == [] and r["clients_failed"] == 0
        assert r["personalized_accuracy"] is not None, (
            "server.py must pass personalized_accuracy=m.get('personalized-accuracy') to RoundRecord")
        baselines = {}  # majority rate -> local test examples of the cohorts that give it
        for cohort in combinations(range(cfg.clients), r["clients_sampled"]):  # all of them when q = 1
            trained = [c for c in cohort if c in sizes]  # a client without rows evaluates nothing
            n = sum(sizes[c] for c in trained)
            if n:
                baselines.setdefault(sum(majorities[c] for c in trained) / n, set()).add(n)
        matching = {n for rate, ns in baselines.items() for n in ns
                    if rate == pytest.approx(r["personalized_majority"], rel=0, abs=1e-12)}
        assert matching, f"round {r['round']}: majority {r['personalized_majority']} is none of {sorted(baselines)}"
        right = [r["personalized_accuracy"] * n for n in matching]
        assert any(abs(k - round(k)) < 1e-6 for k in right), f"round {r['round']}: no count over {matching} examples"


def test_fedsa_run_keeps_b_at_home_and_reports_personalized_accuracy(tmp_path):
    cfg, out, results = _run(tmp_path, "plain")
    ws = get_workspace(cfg)
    shared = sum(_npy_bytes(k, v) for k, v in ws.initial_state.items() if not is_lora_b(k))
    for r in out.rounds:  # q = 1: every client replies every round
        assert r.clients_sampled == 4 and r.bytes_up == 4 * shared
    store = LocalParamStore(tmp_path / "plain" / "client_state" / LOCAL_PARAMS_DIR)
    assert _saved_keys(store) == ["0", "1", "2", "3"]
    _assert_personalized(cfg, results)


def _diagnostics(tmp_path, name: str) -> dict:
    """Under DP the personalised numbers are client-reported: results.json has them null, the
    diagnostics file (asked for with diagnostics=True) has them."""
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert all(r["personalized_accuracy"] is None and r["rejections"] is None for r in results["rounds"])
    return json.loads((tmp_path / name / DIAGNOSTICS_FILE).read_text())


def test_fedsa_run_with_user_dp_and_compeft(tmp_path):
    # seeded cohorts (seed 1 samples 4 clients in both rounds): a secret one may sample
    # nobody in a round (probability 2^-8), which leaves no personalized accuracy to report
    cfg, out, _ = _run(tmp_path, "user", clients=8, cohort=4, epsilon=5.0, compression="compeft",
                     density=0.2, diagnostics=True, insecure_reproducible_noise=True, seed=1)
    results = _diagnostics(tmp_path, "user")
    assert out.final.dp_level == "user" and 0 < out.final.epsilon <= 5.0
    residuals = tmp_path / "user" / "client_state" / "residuals"
    for f in residuals.glob("*.safetensors"):  # error feedback never saw B
        assert not _b_keys(load_file(f))
    assert any(residuals.glob("*.safetensors"))
    _assert_personalized(cfg, results)


def test_fedsa_run_with_sample_dp(tmp_path):
    cfg, out, _ = _run(tmp_path, "sample", dp="sample", noise_multiplier=1.0, diagnostics=True,
                     insecure_reproducible_noise=True)
    results = _diagnostics(tmp_path, "sample")
    assert out.final.dp_level == "sample" and out.final.epsilon > 0
    _assert_personalized(cfg, results)
