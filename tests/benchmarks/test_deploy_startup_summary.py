"""bench_deploy_startup's log reading and summary (the deployment runs themselves are too heavy
for the suite): a task or message logged twice counts once, overheads are task time minus
training, and the results table renders row 9 from the committed results."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

WARM_LOG = """\x1b[92mINFO \x1b[0m:      fedpeft worker acquired task 7 (FAB 81def7eb4917)
\x1b[92mINFO \x1b[0m:      fedpeft message train client 0 round 1 [workspace built #1 (data 0.40 s, tokenise 1.00 s, model 0.20 s)]: process age 24.00 s | imports 0.05 s | workspace 1.60 s | training 1.50 s | reply 0.00 s
11/30/2026 02:57:09:INFO:fedpeft message train client 0 round 1 [workspace built #1 (data 0.40 s, tokenise 1.00 s, model 0.20 s)]: process age 24.00 s | imports 0.05 s | workspace 1.60 s | training 1.50 s | reply 0.00 s
\x1b[92mINFO \x1b[0m:      fedpeft worker task 7 train: pull 0.30 s | load 0.00 s | handler 3.20 s | push 0.20 s | total 3.70 s | status completed
11/30/2026 02:57:09:INFO:fedpeft worker task 7 train: pull 0.30 s | load 0.00 s | handler 3.20 s | push 0.20 s | total 3.70 s | status completed
\x1b[92mINFO \x1b[0m:      fedpeft message train client 0 round 2 [workspace cached]: process age 30.00 s | imports 0.00 s | workspace 0.00 s | training 1.00 s | reply 0.00 s
\x1b[92mINFO \x1b[0m:      fedpeft worker task 9 train: pull 0.60 s | load 0.00 s | handler 1.01 s | push 0.15 s | total 1.76 s | status completed
"""


def _bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("bench_deploy_startup")


def test_warm_overheads_are_task_time_minus_training_counted_once() -> None:
    b = _bench()
    logs = {"node-0": WARM_LOG}
    run = {"mode": "warm", "round_wall_s": [9.0, 6.0], "messages": b.messages_from_logs(logs),
           "tasks": b.tasks_from_logs(logs)}
    assert len(run["messages"]) == 2 and len(run["tasks"]) == 2
    s = b.summarise(run)
    assert [round(x, 2) for x in s["train_overhead_s"]] == [2.2, 0.76]
    assert round(s["train_overhead_building_mean_s"], 2) == 2.2
    assert round(s["train_overhead_cached_mean_s"], 2) == 0.76
    assert s["round_wall_mean_s"] == 7.5 and s["rounds_after_first_mean_s"] == 6.0


def test_process_per_message_overhead_is_age_plus_imports_workspace_reply() -> None:
    b = _bench()
    line = ("INFO : fedpeft message train client 1 round 1 [workspace built #1 (data 0.2 s)]: "
            "process age 2.00 s | imports 9.00 s | workspace 1.50 s | training 2.00 s | reply 0.01 s")
    run = {"mode": "subprocess", "round_wall_s": [20.0], "messages": b.messages_from_logs({"n": line}),
           "tasks": []}
    assert [round(x, 2) for x in b.summarise(run)["train_overhead_s"]] == [12.51]


def test_results_table_has_the_deployment_row() -> None:
    _bench()  # puts benchmarks/ on sys.path
    make_table = importlib.import_module("make_table")
    rows = [r for r in make_table.rows(BENCH / "results") if r[0].startswith("9. ")]
    assert len(rows) == 1 and rows[0][1] == "<= 5 s" and rows[0][3] in ("yes", "no")
