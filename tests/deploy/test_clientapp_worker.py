"""The warm ClientApp worker against a real SuperLink and SuperNode (no torch: a tiny app).

A tiny Flower App reports, per message, the PID that ran it, an id drawn when its module was
imported, how many messages that import has served, and where its code came from. Through
``fedpeft.deploy.node`` (SuperNode ``--isolation process`` + worker) three messages of one
run are served by one process and one import; a second run with a different FAB is served by
the same PID (the worker re-executes itself) with a fresh import of the *new* FAB's code; after
the worker is killed, the node starts another one and a third run is served by it.
Also plain functions: task-line parsing, the supervisor's argument checks.

Run with ``pytest -m deployment tests/deploy/test_clientapp_worker.py`` (~1 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import tomli_w

from fedpeft.deploy import launcher as L
from fedpeft.deploy.clientapp_worker import _without_token, parse_task_line
from fedpeft.deploy.node import main as node_main

CLIENT = '''
import os, uuid
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

MARKER = "{marker}"
LOAD_ID = uuid.uuid4().hex
SERVED = [0]
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    SERVED[0] += 1
    return Message(RecordDict({{
        "metrics": MetricRecord({{"pid": os.getpid(), "served": SERVED[0]}}),
        "info": ConfigRecord({{"load-id": LOAD_ID, "marker": MARKER, "file": __file__}}),
    }}), reply_to=msg)
'''

SERVER = '''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    out = []
    for r in range(int(context.run_config["messages"])):
        msg = Message(RecordDict({"config": ConfigRecord({"round": r})}), dst_node_id=nodes[0],
                      message_type="train")
        for rep in grid.send_and_receive([msg], timeout=120):
            assert not rep.has_error(), rep.error
            out.append({**dict(rep.content["metrics"]), **dict(rep.content["info"])})
    Path(context.run_config["out"]).write_text(json.dumps(out))
'''


def _write_app(root: Path, marker: str) -> Path:
    pkg = root / "tinyapp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "client.py").write_text(CLIENT.format(marker=marker))
    (pkg / "server.py").write_text(SERVER)
    (root / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "tinyapp", "version": "1.0.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fedpeft-tests",
                                  "components": {"serverapp": "tinyapp.server:app",
                                                 "clientapp": "tinyapp.client:app"},
                                  "config": {"messages": 3, "out": ""}}}}}))
    return root


@pytest.mark.deployment
def test_one_worker_process_serves_every_message_and_switches_fab_by_reexec(tmp_path: Path) -> None:
    flwr_home = tmp_path / "flwr-home"
    env = L.flwr_env(flwr_home)
    port, runtime_port = L.free_port(), L.free_port()
    L.write_connection(flwr_home, "tiny", f"127.0.0.1:{port}", insecure=True)
    procs = L.Processes(tmp_path / "logs", env)
    try:
        link = procs.start("superlink", L.superlink_argv(host="127.0.0.1", port=port, insecure=True,
                                                         node_auth=False), cwd=tmp_path)
        L.wait_for_port("127.0.0.1", port, timeout=60, proc=link.popen)
        node_cmd = L.node_argv(superlink=f"127.0.0.1:{port}", runtime_port=runtime_port,
                               insecure=True, node_config={"partition-id": 0, "num-partitions": 1})
        node_cmd[node_cmd.index("--"):node_cmd.index("--")] = ["--worker-arg=--no-preload"]
        node = procs.start("node", node_cmd)
        results = []
        workers: set[int] = set()  # every worker process seen under the node
        for marker in ("a", "b", "c"):
            if marker == "c":  # the worker crashes: the node starts a new one and keeps serving
                os.kill(results[-1][0]["pid"], signal.SIGKILL)
                deadline = time.monotonic() + 60
                while not _live_workers(node) - {results[-1][0]["pid"]} and time.monotonic() < deadline:
                    procs.snapshot()
                    time.sleep(0.2)
            app_dir = _write_app(tmp_path / f"app-{marker}", marker)
            out = tmp_path / f"out-{marker}.json"
            run = procs.start(f"run-{marker}", [L.flower_bin("flwr"), "run", str(app_dir), "tiny",
                                                "--stream", "--run-config", f'out="{out}"'])
            deadline = time.monotonic() + 240
            while run.popen.poll() is None and time.monotonic() < deadline:
                procs.snapshot()
                workers |= _live_workers(node)
                time.sleep(0.5)
            assert run.popen.returncode == 0, procs.logs()
            results.append(json.loads(out.read_text()))
        node_log = node.log_text()
    finally:
        procs.stop_all()
    first, second, third = results
    assert [m["served"] for m in first] == [1, 2, 3]
    assert len({m["pid"] for m in first}) == 1 and len({m["load-id"] for m in first}) == 1
    assert first[0]["pid"] in workers  # the worker ran them, not a flwr-clientapp per message
    assert all(m["marker"] == "a" and m["file"].startswith(str(flwr_home)) for m in first)
    # a new FAB: the same process (re-exec keeps the PID), freshly imported code of that FAB
    assert {m["pid"] for m in second} == {first[0]["pid"]}
    assert [m["served"] for m in second] == [1, 2, 3]
    assert {m["marker"] for m in second} == {"b"} and second[0]["load-id"] != first[0]["load-id"]
    # after the crash: a new worker process, the same three messages served by it
    assert len({m["pid"] for m in third}) == 1 and third[0]["pid"] != first[0]["pid"]
    assert third[0]["pid"] in workers and [m["served"] for m in third] == [1, 2, 3]
    assert "worker exited with -9; restarting it" in node_log
    assert "Start `flwr-clientapp` process" not in node_log
    tasks = [t for t in map(parse_task_line, node_log.splitlines()) if t]
    assert [t["kind"] for t in tasks] == ["train"] * 9
    assert procs.leftovers() == []


def _live_workers(node: L.Proc) -> set[int]:
    return {pid for pid in node.alive_pids() if "clientapp_worker" in _cmdline(pid)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_task_line_parses_back_into_its_phases() -> None:
    line = ("INFO :      fedpeft worker task 42 train: pull 0.05 s | load 1.20 s | handler 3.10 s"
            " | push 0.02 s | total 4.37 s | status completed")
    assert parse_task_line(line) == {"task": 42, "kind": "train", "pull": 0.05, "load": 1.2,
                                     "handler": 3.1, "push": 0.02, "total": 4.37}
    assert parse_task_line("INFO : Received successfully") is None


def test_reexec_argv_drops_only_the_handed_over_token() -> None:
    argv = ["--runtime-api-address", "127.0.0.1:1", "--token", "t1", "--no-preload", "--token=t0"]
    assert _without_token(argv) == ["--runtime-api-address", "127.0.0.1:1", "--no-preload"]


def test_node_refuses_a_supernode_that_would_run_clientapps_itself() -> None:
    with pytest.raises(SystemExit):
        node_main(["--runtime-api-address", "127.0.0.1:1", "--", "flower-supernode", "--insecure"])


def test_warm_node_command_wraps_a_process_isolated_supernode_on_the_same_runtime_port() -> None:
    argv = L.node_argv(superlink="127.0.0.1:1", runtime_port=9123, insecure=True,
                       node_config={"partition-id": 0, "num-partitions": 1})
    sep = argv.index("--")
    assert argv[1:3] == ["-m", "fedpeft.deploy.node"]
    assert argv[argv.index("--runtime-api-address") + 1] == "127.0.0.1:9123"
    supernode = argv[sep + 1:]
    assert supernode[supernode.index("--isolation") + 1] == "process"
    assert supernode[supernode.index("--port") + 1] == "9123"
    plain = L.node_argv(superlink="127.0.0.1:1", runtime_port=9123, insecure=True, clientapp="subprocess",
                        node_config={"partition-id": 0, "num-partitions": 1})
    assert "--isolation" not in plain and Path(plain[0]).name == "flower-supernode"
