"""Long end-to-end runs through the real CLI on the Ray backend (``pytest -m slow``)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

GRID = """name = "slow_e2e"
[base]
clients = 4
cohort = 4
rounds = 2
max-client-examples = 16
max-test-examples = 64
partition = "dirichlet"
dirichlet-alpha = 0.3
backend = "ray"
[grid]
strategy = ["fedavg", "flora"]
seed = [0]
"""


def _fedpeft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from fedpeft.cli import main; raise SystemExit(main())", *args],
                          capture_output=True, text=True, timeout=1200)


def test_compare_cli_on_ray_writes_table_csv_and_plots(tmp_path):
    config = tmp_path / "grid.toml"
    config.write_text(GRID)
    out = tmp_path / "cmp"
    done = _fedpeft("compare", str(config), "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["setting"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert set(rows) == {"strategy=fedavg", "strategy=flora"}
    # FLoRA folds exactly (float32 only) and sends dense folded weights down
    assert float(rows["strategy=flora"]["aggregation_error_mean"]) < 1e-3 < float(rows["strategy=fedavg"]["aggregation_error_mean"])
    assert float(rows["strategy=flora"]["bytes_down_total"]) > 10 * float(rows["strategy=fedavg"]["bytes_down_total"])
    for png in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "aggregation_error_vs_round.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "runs" / "strategy=flora__seed=0" / "results.json").read_text())
    assert run["config"]["backend"] == "ray" and len(run["rounds"]) == 2


def test_simulate_cli_on_ray_with_compressed_download(tmp_path):
    out = tmp_path / "run"
    done = _fedpeft("simulate", "--clients", "6", "--cohort", "3", "--rounds", "2", "--max-client-examples", "16",
                    "--max-test-examples", "64", "--compression", "compeft", "--compress-down", "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["final"]["accuracy"] is not None
    dense = 4 * 74_498  # float32 bytes of the default trainable state (LoRA r8 q/v + head)
    first, second = res["rounds"]
    assert first["bytes_down"] < 1000 * max(first["clients_sampled"], 1)  # seeded start: a header
    if second["clients_sampled"]:
        assert second["bytes_down"] / second["clients_sampled"] < dense / 10  # ~1 bit per parameter
