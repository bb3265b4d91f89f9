"""``--task causal-lm`` off the driver: on the forked process pool (the default backend on one
Linux machine: workers train and score shards of the test chats) and on Flower's Ray backend
(one round, 21-24 s at load ~7, like tests/federation/test_simulation_e2e.py's Ray run), a
tiny-Llama run reports what the in-process run reports."""

from __future__ import annotations

import json

import pytest

from fedpeft.cli import main


def _run(tiny_lm, tmp_path, backend: str, rounds: int) -> dict:
    model, data = tiny_lm
    out = tmp_path / backend
    assert main(["simulate", "--task", "causal-lm", "--model", str(model), "--dataset", str(data),
                 "--backend", backend, "--clients", "4", "--cohort", "4", "--rounds", str(rounds), "--lr", "0.01",
                 "--batch-size", "4", "--max-client-examples", "0", "--output", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def _same(a: dict, b: dict) -> None:
    """Same clients and bytes; losses equal up to float summation order (1 thread per worker)."""
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        for key in ("clients_sampled", "bytes_up", "bytes_down"):
            assert ra[key] == rb[key], key
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["eval_loss"] == pytest.approx(rb["eval_loss"], rel=1e-4)
        assert ra["eval_perplexity"] == pytest.approx(rb["eval_perplexity"], rel=1e-4)


def test_a_causal_lm_run_on_the_process_pool_matches_the_inprocess_run(tiny_lm, tmp_path):
    pool, local = _run(tiny_lm, tmp_path, "processes", 2), _run(tiny_lm, tmp_path, "inprocess", 2)
    assert pool["config"]["backend"] == "processes" and pool["rounds"][0]["clients_sampled"] == 4
    _same(pool, local)


def test_a_causal_lm_round_on_ray_matches_the_inprocess_run(tiny_lm, tmp_path):
    ray, local = _run(tiny_lm, tmp_path, "ray", 1), _run(tiny_lm, tmp_path, "inprocess", 1)
    assert ray["config"]["backend"] == "ray" and ray["rounds"][0]["worker_nodes"] == 1
    _same(ray, local)
