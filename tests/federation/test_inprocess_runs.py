"""Whole runs on the in-process backend (same ServerApp loop and ClientApp, no Ray):
privacy, compression, adapters and determinism end to end, checked against independent values."""

from __future__ import annotations

import dataclasses

import pytest
from opacus.accountants.utils import get_noise_multiplier

from fedpeft.settings import resolve
from fedpeft.privacy import RDP_ORDERS
from fedpeft.simulation import simulate

TINY = dict(backend="inprocess", max_client_examples=16, max_test_examples=64, batch_size=8)


def _run(tmp_path, name, **kw):
    cfg = resolve({**TINY, **kw, "output": str(tmp_path / name)})
    return cfg, simulate(cfg, [])


def test_user_level_dp_meets_epsilon_with_opacus_calibrated_noise(tmp_path):
    cfg, out = _run(tmp_path, "dp", clients=20, cohort=4, rounds=2, epsilon=3.0)
    f = out.final
    assert f.dp_level == "user" and f.accountant == "rdp"
    assert f.delta == pytest.approx(min(1e-5, 20 ** -1.1))
    z = get_noise_multiplier(target_epsilon=3.0, target_delta=f.delta, sample_rate=0.2, steps=2,
                             accountant="rdp", alphas=RDP_ORDERS)
    assert f.noise_multiplier == pytest.approx(z, rel=1e-9)
    eps = [r.epsilon for r in out.rounds]
    assert 0 < eps[0] < eps[1] == pytest.approx(f.epsilon) and f.epsilon <= 3.0
    assert all(r.aggregation_error is None for r in out.rounds)


def test_lora_fair_with_user_dp_is_refused():
    from fedpeft.errors import UsageError

    with pytest.raises(UsageError, match="lora-fair"):
        resolve({"strategy": "lora-fair", "epsilon": 2.0, "clients": 100})


def test_compeft_upload_is_an_order_of_magnitude_smaller(tmp_path):
    _, dense = _run(tmp_path, "dense", clients=4, cohort=4, rounds=1)
    _, comp = _run(tmp_path, "comp", clients=4, cohort=4, rounds=1, compression="compeft", density=0.2)
    ratio = dense.rounds[0].bytes_up / comp.rounds[0].bytes_up
    # SPEC §2.3: ~0.94 bits/param at density 0.2 vs 32 for float32 (34x); headers cost a little
    assert 20 < ratio < 40
    assert (tmp_path / "comp" / "client_state" / "residuals").is_dir()  # error feedback state


def test_ffa_lora_has_zero_aggregation_error_and_half_upload(tmp_path):
    _, lora = _run(tmp_path, "lora", clients=4, cohort=4, rounds=1, partition="dirichlet", dirichlet_alpha=0.3,
                   max_client_examples=32)
    _, ffa = _run(tmp_path, "ffa", clients=4, cohort=4, rounds=1, adapter="ffa-lora", partition="dirichlet",
                  dirichlet_alpha=0.3, max_client_examples=32)
    assert ffa.rounds[0].aggregation_error <= 1e-6 < lora.rounds[0].aggregation_error
    per_client = lambda o: o.rounds[0].bytes_up / o.rounds[0].clients_sampled  # noqa: E731
    assert 0.45 < per_client(ffa) / per_client(lora) < 0.55


def test_same_seed_same_results(tmp_path):
    _, a = _run(tmp_path, "a", clients=6, cohort=3, rounds=2, seed=7)
    _, b = _run(tmp_path, "b", clients=6, cohort=3, rounds=2, seed=7)
    strip = lambda rs: [dataclasses.replace(r, wall_s=0.0) for r in rs]  # noqa: E731
    assert strip(a.rounds) == strip(b.rounds)
    _, c = _run(tmp_path, "c", clients=6, cohort=3, rounds=2, seed=8)
    assert strip(c.rounds) != strip(a.rounds)


def test_eval_every_skips_intermediate_rounds(tmp_path):
    _, out = _run(tmp_path, "ev", clients=4, cohort=4, rounds=3, eval_every=2)
    assert [r.eval_accuracy is not None for r in out.rounds] == [False, True, True]
    assert out.final.accuracy == out.rounds[-1].eval_accuracy


def test_inprocess_clients_and_evaluation_use_every_core_of_the_process(tmp_path, monkeypatch):
    """In process nothing else trains beside the client: it (and the central evaluation after
    it) gets the process' cores, not the 1 thread a Ray actor reserves (cpus_per_client)."""
    import os

    import torch

    import fedpeft.federation.central_eval as central_eval
    import fedpeft.engine.client as client

    seen: dict[str, list[int]] = {"train": [], "eval": []}
    train, evaluate = client.train_client, central_eval.evaluate_shard

    def spy_train(*a, **kw):
        seen["train"].append(torch.get_num_threads())
        return train(*a, **kw)

    def spy_eval(*a, **kw):
        seen["eval"].append(torch.get_num_threads())
        return evaluate(*a, **kw)

    monkeypatch.setattr(client, "train_client", spy_train)
    monkeypatch.setattr(central_eval, "evaluate_shard", spy_eval)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _run(tmp_path, "threads", clients=4, cohort=4, rounds=2, cpus_per_client=1.0)
    finally:
        torch.set_num_threads(before)
    cores = len(os.sched_getaffinity(0))
    assert len(seen["train"]) >= 4 and len(seen["eval"]) == 2
    assert set(seen["train"]) == {cores} and set(seen["eval"]) == {cores}
