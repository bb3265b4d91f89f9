"""Error feedback keeps the running sum; residual stores round trip and persist (SPEC §2.3)."""

from __future__ import annotations

import os

import pytest
import torch

from fedpeft.compression import (
    DiskResidualStore,
    ErrorFeedback,
    InMemoryResidualStore,
    build_codec,
    decode_payload,
    error_feedback_step,
)


def update(seed: int, rows: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"A": torch.randn(rows, 20, generator=g), "B": torch.randn(20, rows, generator=g) * 0.1}


def test_first_step_sends_compressed_update_and_keeps_the_difference():
    codec = build_codec("compeft", density=0.1)
    tau = update(0)
    payload, sent, residual = error_feedback_step(tau, None, codec)
    expected = codec.compress(tau)  # independent: C(τ), e = τ - C(τ)
    for k in tau:
        assert torch.equal(sent[k], expected[k])
        assert torch.equal(residual[k], tau[k] - expected[k])
        assert torch.equal(decode_payload(payload, expected={n: t.shape for n, t in tau.items()})[k], sent[k])


def test_second_step_compresses_update_plus_residual():
    codec = build_codec("stc", density=0.2)
    _, _, e1 = error_feedback_step(update(1), None, codec)
    tau2 = update(2)
    _, sent2, _ = error_feedback_step(tau2, e1, codec)
    expected = codec.compress({k: tau2[k] + e1[k] for k in tau2})
    assert all(torch.equal(sent2[k], expected[k]) for k in tau2)
    assert not all(torch.equal(sent2[k], codec.compress(tau2)[k]) for k in tau2)


@pytest.mark.parametrize("name", ["compeft", "stc"])
def test_running_sum_of_sent_plus_residual_equals_sum_of_updates(name):
    codec = build_codec(name, density=0.05)
    residual = None
    total_sent = {k: torch.zeros_like(v) for k, v in update(0).items()}
    total_tau = {k: torch.zeros_like(v) for k, v in update(0).items()}
    for t in range(8):
        tau = update(100 + t)
        _, sent, residual = error_feedback_step(tau, residual, codec)
        for k in tau:
            total_sent[k] += sent[k]
            total_tau[k] += tau[k]
    for k in total_tau:
        torch.testing.assert_close(total_sent[k] + residual[k], total_tau[k], rtol=0, atol=1e-5)
        assert not torch.allclose(total_sent[k], total_tau[k], atol=1e-3)  # compression did drop mass


def test_running_sum_holds_when_the_uploaded_rank_prefix_changes():
    # DP-DyLoRA uploads the first b_t rank components: shapes differ across rounds.
    codec = build_codec("compeft", density=0.1)
    residual = None
    total = {"A": torch.zeros(8, 20), "B": torch.zeros(20, 8)}
    sent_total = {"A": torch.zeros(8, 20), "B": torch.zeros(20, 8)}
    for t, rank in enumerate([8, 3, 5, 2, 8]):
        tau = update(200 + t, rows=rank)
        _, sent, residual = error_feedback_step(tau, residual, codec)
        for k in tau:
            block = tuple(slice(0, s) for s in tau[k].shape)
            total[k][block] += tau[k]
            sent_total[k][block] += sent[k]
    for k in total:
        assert residual[k].shape == total[k].shape
        torch.testing.assert_close(sent_total[k] + residual[k], total[k], rtol=0, atol=1e-5)


def test_residual_keys_absent_from_an_update_are_carried_untouched():
    codec = build_codec("compeft", density=0.1)
    _, _, e1 = error_feedback_step(update(3), None, codec)
    _, _, e2 = error_feedback_step({"A": update(4)["A"]}, e1, codec)
    assert torch.equal(e2["B"], e1["B"])


@pytest.mark.parametrize("make_store", [lambda tmp: InMemoryResidualStore(),
                                        lambda tmp: DiskResidualStore(tmp / "residuals")],
                         ids=["memory", "disk"])
def test_store_round_trips_exactly_and_deletes(tmp_path, make_store):
    store = make_store(tmp_path)
    assert store.get(7) is None and 7 not in store and len(store) == 0
    state = {"x.lora_A.default.weight": torch.randn(4, 3), "head": torch.randn(5, dtype=torch.float64)}
    store.put(7, state)
    got = store.get(7)
    assert set(got) == set(state)
    for k in state:
        assert got[k].dtype == state[k].dtype and torch.equal(got[k], state[k])
    state["head"] += 1  # the store holds its own copy
    assert not torch.equal(store.get(7)["head"], state["head"])
    store.put("client-b", {"w": torch.ones(2)})
    assert list(store.client_ids()) == ["7", "client-b"] and len(store) == 2
    store.delete(7)
    assert store.get(7) is None and list(store.client_ids()) == ["client-b"]


def test_disk_store_survives_a_new_instance_and_writes_one_file_per_client(tmp_path):
    first = DiskResidualStore(tmp_path)
    for cid in (0, 5, 99_999):
        first.put(cid, {"w": torch.full((3,), float(cid))})
    second = DiskResidualStore(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["0.safetensors", "5.safetensors", "99999.safetensors"]
    assert torch.equal(second.get(99_999)["w"], torch.full((3,), 99_999.0))
    assert set(vars(second)) == {"directory"}  # nothing per client held in memory


def test_disk_store_write_is_atomic_when_replace_fails(tmp_path, monkeypatch):
    store = DiskResidualStore(tmp_path)
    store.put(1, {"w": torch.zeros(3)})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put(1, {"w": torch.ones(3)})
    monkeypatch.undo()
    assert torch.equal(store.get(1)["w"], torch.zeros(3))  # old residual intact
    assert os.listdir(tmp_path) == ["1.safetensors"]  # no temporary file left behind


def test_disk_store_rejects_client_ids_that_are_not_plain_file_names(tmp_path):
    store = DiskResidualStore(tmp_path)
    for bad in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            store.put(bad, {"w": torch.zeros(1)})


def test_error_feedback_over_disk_store_matches_in_memory_across_store_instances(tmp_path):
    codec = build_codec("compeft", density=0.1)
    memory = ErrorFeedback(codec, InMemoryResidualStore())
    for t in range(4):
        for cid in (3, 8):
            disk = ErrorFeedback(codec, DiskResidualStore(tmp_path))  # fresh instance each time
            p_disk, s_disk = disk.encode(cid, update(10 * t + cid))
            p_mem, s_mem = memory.encode(cid, update(10 * t + cid))
            assert p_disk == p_mem
            assert all(torch.equal(s_disk[k], s_mem[k]) for k in s_mem)
    final = DiskResidualStore(tmp_path).get(8)
    assert all(torch.equal(final[k], memory.store.get(8)[k]) for k in final)
