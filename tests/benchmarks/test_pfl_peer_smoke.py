"""Smoke run of the pfl-research peer benchmark (``benchmarks/bench_pfl_peer.py``).

pfl lives in its own venv (it pins dp-accounting 0.5.1; fedpeft pins 0.6.0), which the test
suite never creates: without it the test is skipped. Create it with
``python benchmarks/bench_pfl_peer.py --setup-venv``; run with ``pytest -m slow``.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their sibling ``common``
    return importlib.import_module(name)


@pytest.mark.slow  # ~2 min of two frameworks' start-up: not in the default suite
def test_pfl_peer_quick_runs_both_sides_on_the_same_job(tmp_path):
    peer = _load("bench_pfl_peer")
    if not peer.pfl_available():
        pytest.skip(f"no pfl venv at {peer.PFL_VENV} (create it with: python benchmarks/bench_pfl_peer.py "
                    "--setup-venv); the test suite does not install it")
    out = peer.main(["--quick", "--rounds", "1", "--max-client-examples", "8", "--max-test-examples", "64",
                     "--fedpeft-backends", "ray,inprocess", "--out", str(tmp_path / "pfl_peer.json")])
    doc = json.loads(Path(out).read_text())
    common = _load("common")
    run = doc["configs"]["A"]
    common.assert_positive(run, ["summary.fedpeft_median.wall_s", "summary.pfl_median.wall_s",
                                 "summary.fedpeft_median.tree_cpu_s", "summary.pfl_median.tree_cpu_s",
                                 "summary.fedpeft_median.peak_rss_gib", "summary.pfl_median.peak_rss_gib"])
    common.assert_positive(run, ["summary.fedpeft-inprocess.median.wall_s",
                                 "summary.fedpeft-inprocess.median.peak_rss_gib"])
    fed, pfl, inproc = run["fedpeft"][0], run["pfl"][0], run["fedpeft-inprocess"][0]
    assert fed["cmd"][-2:] == ["--backend", "ray"]
    assert inproc["cmd"][-2:] == ["--backend", "inprocess"]
    assert run["same_cohort_sizes_checked"] is True
    # same clients, rows, initial adapter and test examples: the two frameworks agree closely
    assert fed["final_accuracy"] == pytest.approx(pfl["final_accuracy"], abs=0.05)
    assert inproc["final_accuracy"] == pytest.approx(fed["final_accuracy"], abs=0.05)


def test_side_summary_ratios_and_targets_from_known_runs():
    peer = _load("bench_pfl_peer")
    run = lambda wall, cpu, rss, pss=None: {  # noqa: E731
        "wall_s": wall, "tree_cpu_s": cpu, "peak_rss_gib": rss, "peak_pss_gib": rss if pss is None else pss,
        "final_accuracy": 0.7, "load_average_before": [1.0, 1.0, 1.0]}
    pfl = [run(100, 120, 1.8, 1.6), run(100, 120, 1.8, 1.6), run(110, 130, 1.8, 1.6)]
    ray = [run(150, 130, 3.5), run(160, 130, 3.5), run(140, 130, 3.5)]
    fast = [run(70, 100, 1.1), run(80, 100, 1.1), run(77, 100, 1.1)]
    forked = [run(70, 100, 2.4, 1.3)] * 3  # summed RSS counts the shared model pages per worker
    s = peer.summarise(ray, pfl, {"fedpeft-inprocess": fast, "fedpeft-processes": forked})
    # the Ray side keeps the fields of earlier result files
    assert s["fedpeft_median"]["wall_s"] == 150 and s["pfl_median"]["wall_s"] == 100
    assert s["pfl_over_fedpeft_wall"] == pytest.approx(100 / 150)
    t = s["fedpeft-inprocess"]
    # per-repetition ratios 0.70, 0.80, 0.70 -> median 0.70; max/min 80/70
    assert t["fedpeft_over_pfl_wall"] == pytest.approx(0.70)
    assert t["fedpeft_over_pfl_rss"] == pytest.approx(1.1 / 1.8)
    assert t["wall_max_over_min"] == pytest.approx(80 / 70)
    assert t["targets_met"] == {"wall_le_0.75x_pfl": True, "rss_le_pfl": True, "pss_le_pfl": True,
                                "spread_le_1.2": True}
    assert s["fedpeft"]["targets_met"] == {"wall_le_0.75x_pfl": False, "rss_le_pfl": False, "pss_le_pfl": False,
                                           "spread_le_1.2": True}
    f = s["fedpeft-processes"]
    assert f["fedpeft_over_pfl_rss"] == pytest.approx(2.4 / 1.8) and f["fedpeft_over_pfl_pss"] == pytest.approx(1.3 / 1.6)
    assert f["targets_met"]["rss_le_pfl"] is False and f["targets_met"]["pss_le_pfl"] is True
    assert s["pfl_wall_max_over_min"] == pytest.approx(1.1)
