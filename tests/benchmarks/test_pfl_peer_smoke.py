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
                     "--out", str(tmp_path / "pfl_peer.json")])
    doc = json.loads(Path(out).read_text())
    common = _load("common")
    run = doc["configs"]["A"]
    common.assert_positive(run, ["summary.fedpeft_median.wall_s", "summary.pfl_median.wall_s",
                                 "summary.fedpeft_median.tree_cpu_s", "summary.pfl_median.tree_cpu_s",
                                 "summary.fedpeft_median.peak_rss_gib", "summary.pfl_median.peak_rss_gib"])
    fed, pfl = run["fedpeft"][0], run["pfl"][0]
    assert run["same_cohort_sizes_checked"] is True
    # same clients, rows, initial adapter and test examples: the two frameworks agree closely
    assert fed["final_accuracy"] == pytest.approx(pfl["final_accuracy"], abs=0.05)
