"""Smoke runs of the cheapest benchmarks (``--quick``): they run and write their JSON fields.

The full benchmarks are not part of the test suite; see ``benchmarks/README.md``.
Both scripts are called in this process so they share one model/data workspace.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):  # noqa: ANN202 - a module
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their sibling ``common``
    return importlib.import_module(name)


def test_flops_quick_writes_positive_rates(tmp_path):
    common = _load("common")
    out = _load("bench_flops").main(["--quick", "--out", str(tmp_path / "flops.json")])
    doc = json.loads(Path(out).read_text())
    assert doc["benchmark"] == "flops" and doc["quick"] is True
    common.assert_positive(doc, ["train_flops_per_step", "train_step_wall_s", "achieved_flops_per_cpu_s",
                                 "matmul_flops_per_cpu_s", "fraction_of_matmul_cpu",
                                 "fraction_of_matmul_wall", "machine.cpu_count"])


def test_dp_step_quick_writes_positive_ratio(tmp_path):
    common = _load("common")
    out = _load("bench_dp_step").main(["--quick", "--out", str(tmp_path / "dp.json")])
    doc = json.loads(Path(out).read_text())
    common.assert_positive(doc, ["results.plain.step_wall_s", "results.dp_sgd.step_wall_s",
                                 "ratio_wall", "ratio_cpu", "config.mean_tokens_per_batch"])


def test_tree_sampler_sees_a_child_process():
    """The RSS sampler counts the process tree of the command it runs."""
    common = _load("common")
    env, tag = common.bench_env()
    res = common.run_measured([sys.executable, "-c", "import time; b = bytearray(50 * 2**20); time.sleep(1.0)"],
                              env=env, tag=tag, interval=0.1)
    assert res["returncode"] == 0
    assert res["peak_rss_bytes"] > 50 * 2**20 and res["peak_pss_bytes"] > 0 and res["samples"] >= 2


def test_feature_cache_quick_writes_a_speedup(tmp_path):
    common = _load("common")
    out = _load("bench_feature_cache").main(["--quick", "--out", str(tmp_path / "fc.json")])
    doc = json.loads(Path(out).read_text())
    common.assert_positive(doc, ["visit_cpu_s.uncached", "visit_cpu_s.cached", "speedup_cpu",
                                 "feature_cpu_s_per_row"])
    assert doc["speedup_cpu"] > 1  # skipping the encoder must be cheaper


def test_scale_quick_measures_startup_and_memory(tmp_path):
    """Two tiny runs (20 and 2000 clients) through the CLI on Ray: both finish and the
    start-up / round split adds up to the measured wall time."""
    common = _load("common")
    out = _load("bench_scale").main(["--quick", "--out", str(tmp_path / "scale.json")])
    doc = json.loads(Path(out).read_text())
    for run in doc["runs"]:
        assert run["returncode"] == 0, run["log_tail"]
        assert abs(run["startup_s"] + sum(run["rounds_wall_s"]) - run["wall_s"]) < 1e-6
    common.assert_positive(doc, ["wall_ratio_vs_first.2000", "rss_ratio_vs_first.2000"])


def test_tree_cpu_counts_a_reaped_child_once():
    """Two children burn 1 CPU-s each and are reaped by their parent, which lives on: the
    tree's CPU is ~2 s, not ~4 s (a child's time is in its samples AND its parent's
    children totals)."""
    common = _load("common")
    script = ("import multiprocessing as mp, time\n"
              "def burn(s):\n"
              "    t = time.process_time()\n"
              "    while time.process_time() - t < s: pass\n"
              "if __name__ == '__main__':\n"
              "    ps = [mp.Process(target=burn, args=(1.0,)) for _ in range(2)]\n"
              "    [p.start() for p in ps]; [p.join() for p in ps]\n"
              "    time.sleep(0.5)\n")
    env, tag = common.bench_env()
    res = common.run_measured([sys.executable, "-c", script], env=env, tag=tag, interval=0.1)
    assert res["returncode"] == 0
    assert 1.9 <= res["tree_cpu_s"] < 3.0, res
