"""A tiny real simulation on Flower's Ray backend (named explicitly: the default backend is
the process pool on Linux): loss decreases and the results files follow the documented schema."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from fedpeft.cli import main
from fedpeft.results import FINAL_KEYS, ROUND_KEYS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    code = main(["simulate", "--clients", "4", "--cohort", "4", "--rounds", "3", "--lr", "3e-3",
                 "--batch-size", "16", "--seed", "1", "--backend", "ray", "--output", str(out)] +
                ["--config", str(_cfg(tmp_path_factory))])
    assert code == 0
    return out


def _cfg(factory):
    p = factory.mktemp("cfg") / "tiny.toml"
    p.write_text("max-client-examples = 64\nmax-test-examples = 200\n")
    return p


def test_loss_decreases(run_dir):
    rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]


def test_results_schema(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res) >= {"config", "rounds", "final"}
    assert res["config"]["clients"] == 4 and res["config"]["max_client_examples"] == 64
    for r in res["rounds"]:
        assert list(r) == ROUND_KEYS  # every key present, null when not applicable
        assert r["clients_sampled"] == 4  # q = cohort/clients = 1
        assert 0.0 <= r["eval_accuracy"] <= 1.0
        assert r["epsilon"] is None and r["aggregation_error"] > 0
    assert list(res["final"]) == FINAL_KEYS
    assert res["final"]["accuracy"] == res["rounds"][-1]["eval_accuracy"]
    assert res["final"]["bytes_up_total"] == sum(r["bytes_up"] for r in res["rounds"])
    assert res["final"]["dp_level"] is None and res["final"]["sample_rate"] == 1.0
    rows = list(csv.DictReader((run_dir / "rounds.csv").open()))
    assert len(rows) == 3 and float(rows[2]["eval_accuracy"]) == res["rounds"][2]["eval_accuracy"]


def test_bytes_are_serialized_payload_sizes(run_dir):
    """Upload size = the .npy buffers of every trainable tensor + key names, per client."""
    from fedpeft.config import RunConfig
    from fedpeft.engine.workspace import get_workspace

    ws = get_workspace(RunConfig(max_test_examples=200, seed=1))
    expected = 0
    for key, t in ws.initial_state.items():
        buf = io.BytesIO()
        np.save(buf, t.numpy(), allow_pickle=False)
        expected += len(buf.getvalue()) + len(key.encode())
    rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
    assert all(r["bytes_up"] == 4 * expected and r["bytes_down"] == 4 * expected for r in rounds)
