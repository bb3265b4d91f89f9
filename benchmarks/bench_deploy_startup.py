"""Benchmark 8: start-up cost of a ClientApp message in a real federation, before and after.

Two measurements, written to ``benchmarks/results/deploy_startup.json``:

1. **One cold message, phase by phase** (``cold_message``): a fresh interpreter does what
   Flower's ``flwr-clientapp`` does for a train message — import Flower's ClientApp runtime,
   import the fedpeft ClientApp, run its ``train`` handler (which imports torch/transformers/
   peft, builds the workspace: data, tokenisation, model; trains; encodes the reply) — then
   handles a second train message in the same process, which is what a warm process pays.
   Twice: with an empty token cache, then with the one the first child left (a fresh
   process that loads its token ids instead of tokenising). Phases come from the handler's
   own timing line (``fedpeft/federation/message_timing.py``).
2. **The 3-node loopback deployment** (``deployment``), once per ``--modes`` entry, back to back:
   SuperLink + 3 SuperNodes on 127.0.0.1 with TLS and SuperNode authentication (the layout of
   ``tests/test_deployment.py``), ``flwr run`` of ``--rounds`` rounds of
   ``clients=3 cohort=3 max-client-examples=32 max-test-examples=64 batch-size=16``.
   ``subprocess`` is Flower's default (a fresh ``flwr-clientapp`` per message: the state
   before issue #17, except that messages after a node's first now load token ids from the
   disk cache); ``warm`` is ``fedpeft.deploy.node`` (one long-lived ClientApp worker per
   node). Each mode starts with an empty ``$FEDPEFT_CACHE_DIR``. Reported: per-round wall
   time from ``results.json``, and per message — parsed from the node logs — the handler's
   phases and, for ``warm``, the worker's task lines (pull, app load, handler, push). Per-message overhead = task wall time minus local training:
   for ``subprocess`` the process age at handler entry + imports + workspace + reply (a lower
   bound: the reply push and process exit after the handler are not timed); for ``warm`` the
   worker's task total minus training. Also: the peak summed RSS of each node's process tree.

    python benchmarks/bench_deploy_startup.py [--modes subprocess,warm] [--rounds 3] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GIB, PYTHON, REPO, TreeSampler, write_result  # noqa: E402

RUN_CONFIG = "clients=3 cohort=3 max-client-examples=32 max-test-examples=64 batch-size=16"
CHILD_FLAG = "--child-message"


# -- 1. one cold message in a fresh process -------------------------------------------------
def _child_message(arrays_path: str) -> None:
    """Runs in a fresh interpreter: Flower's ClientApp runtime import, then two train messages."""
    from fedpeft.federation.message_timing import process_age_s

    phases: dict[str, Any] = {"interpreter": process_age_s()}
    t = time.perf_counter()
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401 - what the flwr-clientapp script imports

    phases["import_flower"] = time.perf_counter() - t
    t = time.perf_counter()
    import logging

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.config import RunConfig
    from fedpeft.federation.client_app import app
    from fedpeft.federation.message_timing import ENV_VAR, parse_line

    phases["import_app"] = time.perf_counter() - t
    os.environ[ENV_VAR] = "1"
    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.getLogger("flwr").addHandler(Grab())
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = RunConfig.from_flat(_run_config_dict())
    with np.load(arrays_path) as data:
        arrays = ArrayRecord({k: Array(data[k]) for k in data.files})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    messages = []
    for server_round in (1, 2):
        config = ConfigRecord({**cfg.to_flat(), "server-round": server_round, "round-rank": 0,
                               "client-id": 0})
        msg = Message(RecordDict({"arrays": arrays, "config": config}), 1, "train")
        msg.metadata.__dict__["_message_id"] = f"m{server_round}"
        t = time.perf_counter()
        reply = app(msg, context)
        assert not reply.has_error(), reply.error
        handler = time.perf_counter() - t
        parsed = next(p for p in map(parse_line, reversed(lines)) if p)
        messages.append({"handler_s": handler, **parsed})
    print(json.dumps({"phases": phases, "messages": messages}))


def _run_config_dict() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in RUN_CONFIG.split():
        k, v = part.split("=")
        out[k] = int(v)
    return out


def cold_message(tmp: Path) -> dict[str, Any]:
    """Broadcast arrays from this process, then two fresh children handle two messages each:
    the first with an empty token cache (``$FEDPEFT_CACHE_DIR``), the second with the cache the
    first one left (a fresh process that no longer tokenises)."""
    import numpy as np

    from fedpeft.config import RunConfig
    from fedpeft.records import to_record
    from fedpeft.engine.workspace import get_workspace

    cfg = RunConfig.from_flat(_run_config_dict())
    ws = get_workspace(cfg)
    record = to_record(ws.initial_state)
    arrays_path = tmp / "broadcast.npz"
    np.savez(arrays_path, **{k: a.numpy() for k, a in record.items()})
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               FEDPEFT_CACHE_DIR=str(tmp / "child-cache"))
    out: dict[str, Any] = {}
    for name in ("empty_token_cache", "filled_token_cache"):
        load0 = os.getloadavg()
        t = time.perf_counter()
        res = subprocess.run([PYTHON, __file__, CHILD_FLAG, str(arrays_path)], env=env, cwd=tmp,
                             capture_output=True, text=True, check=False, timeout=600)
        wall = time.perf_counter() - t
        if res.returncode != 0:
            raise RuntimeError(f"cold-message child failed:\n{res.stderr[-3000:]}")
        doc = json.loads(res.stdout.strip().splitlines()[-1])
        first, second = doc["messages"]
        p = doc["phases"]
        cold_total = (p["interpreter"] or 0.0) + p["import_flower"] + p["import_app"] + first["handler_s"]
        doc.update({
            "child_wall_s": wall, "load_average_before": load0, "load_average_after": os.getloadavg(),
            # what a fresh flwr-clientapp pays on top of training, and what a warm process pays
            "cold_overhead_s": cold_total - first["training"],
            "warm_overhead_s": second["handler_s"] - second["training"],
            "cold_total_s": cold_total, "warm_total_s": second["handler_s"],
        })
        out[name] = doc
    return out


# -- 2. the 3-node loopback deployment -------------------------------------------------------
def deployment(mode: str, rounds: int, tmp: Path, timeout: float) -> dict[str, Any]:
    from fedpeft.deploy import app, certs, keys
    from fedpeft.deploy import launcher as L

    tls = certs.generate(tmp / "certs", ["127.0.0.1"])
    node_keys = [keys.generate(tmp / "keys", f"supernode-{i}") for i in range(3)]
    app_dir = app.write_app(tmp / "fedpeft-app")
    out_dir = tmp / "run-output"
    results = out_dir / "results.json"
    flwr_home = tmp / "flwr-home"
    env = L.flwr_env(flwr_home)
    env["HF_HOME"] = str(tmp / "hf-home")
    port = L.free_port()
    address = f"127.0.0.1:{port}"
    L.write_connection(flwr_home, "bench", address, tls.ca_cert)
    procs = L.Processes(tmp / "logs", env)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    samplers: list[TreeSampler] = []
    run_cmd: list[str] = []
    node_cmds: list[list[str]] = []
    try:
        L.start_loopback_superlink(
            procs, port=port, ca_cert=tls.ca_cert, server_cert=tls.server_cert, server_key=tls.server_key,
            public_keys=[k.public for k in node_keys], connection="bench", env=env, cwd=tmp)
        for i in range(3):
            argv = L.node_argv(superlink=address, runtime_port=L.free_port(), ca_cert=tls.ca_cert,
                               private_key=node_keys[i].private, clientapp=mode,
                               node_config={"partition-id": i, "num-partitions": 3})
            node_cmds.append(argv)
            samplers.append(TreeSampler(procs.start(f"node-{i}", argv).pid, interval=1.0).__enter__())
        timings["setup_s"] = time.perf_counter() - t0
        run_cmd = [L.flower_bin("flwr"), "run", str(app_dir), "bench", "--stream", "--run-config",
                   f'{RUN_CONFIG} rounds={rounds} output="{out_dir}"']
        t_run = time.perf_counter()
        run = procs.start("flwr-run", run_cmd)
        while run.popen.poll() is None and time.perf_counter() - t_run < timeout:
            procs.snapshot()
            time.sleep(1.0)
        timings["flwr_run_s"] = time.perf_counter() - t_run
        returncode = run.popen.poll()
    finally:
        for sampler in samplers:
            sampler.__exit__(None, None, None)
        procs.stop_all(grace=10.0)
    record = json.loads(results.read_text()) if results.exists() else {"rounds": []}
    node_logs = {name: p.log_text() for name, p in procs.procs.items() if name.startswith("node-")}
    return {
        "mode": mode, "returncode": returncode, "rounds": rounds,
        "round_wall_s": [r["wall_s"] for r in record["rounds"]],
        "final_accuracy": (record.get("final") or {}).get("accuracy"),
        "load_average_before": load0, "load_average_after": os.getloadavg(), **timings,
        "messages": messages_from_logs(node_logs), "tasks": tasks_from_logs(node_logs),
        "commands": {"node_0": node_cmds[0] if node_cmds else [], "flwr_run": run_cmd},
        "leftover_pids": procs.leftovers(),
        # peak summed RSS of each node's process tree (SuperNode, its executor, ClientApp processes)
        "node_peak_rss_gib": [sm.peak_rss / GIB for sm in samplers],
    }


#: the format of the root handler opacus' import installs (logging.basicConfig): a second copy
#: of every Flower line in a process that imported opacus
_ROOT_COPY = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:")


def messages_from_logs(logs: dict[str, str]) -> list[dict[str, Any]]:
    from fedpeft.federation.message_timing import parse_line

    return [{"node": node, **parsed} for node, text in logs.items() for line in text.splitlines()
            if not _ROOT_COPY.match(line) and (parsed := parse_line(line))]


def tasks_from_logs(logs: dict[str, str]) -> list[dict[str, Any]]:
    from fedpeft.deploy.clientapp_worker import parse_task_line

    seen: dict[tuple[str, int], dict[str, Any]] = {}  # a line logged twice counts once
    for node, text in logs.items():
        for parsed in map(parse_task_line, text.splitlines()):
            if parsed:
                seen.setdefault((node, parsed["task"]), {"node": node, **parsed})
    return list(seen.values())


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """Per-message overheads (task wall minus training) and round walls of one mode."""
    trains = [m for m in run["messages"] if m["kind"] == "train"]
    out: dict[str, Any] = {"round_wall_s": run["round_wall_s"],
                           "round_wall_mean_s": statistics.fmean(run["round_wall_s"]) if run["round_wall_s"] else None,
                           "rounds_after_first_mean_s": (statistics.fmean(run["round_wall_s"][1:])
                                                         if len(run["round_wall_s"]) > 1 else None)}
    if run["mode"] == "subprocess":
        over = [(m.get("process_age") or 0.0) + m["imports"] + m["workspace"] + m["reply"] for m in trains]
        out["train_overhead_s"] = over
        out["overhead_note"] = "lower bound: process age at handler entry + imports + workspace + reply"
    else:
        tasks = [t for t in run["tasks"] if t.get("kind") == "train"]
        by_node: dict[str, list[dict]] = {}
        for m in trains:
            by_node.setdefault(m["node"], []).append(m)
        over = []
        for t in tasks:
            ms = by_node.get(t["node"], [])
            if ms:
                over.append(t["total"] - ms.pop(0)["training"])
        out["train_overhead_s"] = over
        out["overhead_note"] = "worker task total (pull + app load + handler + push) minus training"
    out["node_peak_rss_gib"] = run.get("node_peak_rss_gib")
    out["train_overhead_max_s"] = max(over) if over else None
    first = [o for o, m in zip(over, trains) if "build_data" in m]
    later = [o for o, m in zip(over, trains) if "build_data" not in m]
    out["train_overhead_building_mean_s"] = statistics.fmean(first) if first else None
    out["train_overhead_cached_mean_s"] = statistics.fmean(later) if later else None
    phase_names = ("process_age", "imports", "workspace", "training", "reply")
    out["train_phase_means_s"] = {k: statistics.fmean(m.get(k) or 0.0 for m in trains) for k in phase_names} if trains else {}
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="subprocess,warm", help="comma list of subprocess,warm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1200.0, help="per deployment run")
    ap.add_argument("--skip-cold", action="store_true", help="only the deployment runs")
    ap.add_argument("--quick", action="store_true", help="2 rounds, warm mode only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.modes = 2, "warm"
    modes = [m for m in args.modes.split(",") if m]
    payload: dict[str, Any] = {"config": {"run_config": RUN_CONFIG, "rounds": args.rounds, "modes": modes,
                                          "nodes": 3, "tls": True, "node_auth": True}}
    with tempfile.TemporaryDirectory(prefix="fedpeft-bench-deploy-") as td:
        tmp = Path(td)
        os.environ["FEDPEFT_CACHE_DIR"] = str(tmp / "parent-cache")  # never ~/.cache here
        if not args.skip_cold:
            (tmp / "cold").mkdir()
            payload["cold_message"] = cold_message(tmp / "cold")
            for name, doc in payload["cold_message"].items():
                print("cold message,", name, json.dumps({k: doc[k] for k in
                                                         ("phases", "cold_overhead_s", "warm_overhead_s")}))
        runs = {}
        for mode in modes:
            (tmp / mode).mkdir()
            os.environ["FEDPEFT_CACHE_DIR"] = str(tmp / mode / "cache")  # every mode starts cold
            runs[mode] = deployment(mode, args.rounds, tmp / mode, args.timeout)
            runs[mode]["summary"] = summarise(runs[mode])
            print(mode, json.dumps(runs[mode]["summary"]))
        payload["deployment"] = runs
        if {"subprocess", "warm"} <= set(runs):
            a, b = runs["subprocess"]["summary"], runs["warm"]["summary"]
            if a["round_wall_mean_s"] and b["round_wall_mean_s"]:
                payload["round_wall_ratio_subprocess_over_warm"] = a["round_wall_mean_s"] / b["round_wall_mean_s"]
    payload["command"] = " ".join([Path(PYTHON).name, "benchmarks/bench_deploy_startup.py", *(argv or sys.argv[1:])])
    return write_result("deploy_startup", payload, args.out, args.quick)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == CHILD_FLAG:
        sys.path.insert(0, str(REPO))
        _child_message(sys.argv[2])
    else:
        main()
