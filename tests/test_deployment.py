"""The fedpeft apps on Flower's deployment runtime: real processes on 127.0.0.1.

One SuperLink (TLS + SuperNode authentication) and three SuperNodes as separate processes,
two rounds via ``flwr run``: the same process layout as ``docker/compose.yaml`` and
``docs/deployment.md``, minus the containers. Each node is ``fedpeft.deploy.node``: the
SuperNode plus its warm ClientApp worker, which serves every message of the run in one
process, so each surviving node builds its workspace once for two rounds. Also shown: a
SuperNode whose key was never registered is refused, and a SuperNode killed (SIGKILL, whole
process tree) in the middle of round 2 — its round-2 message received, its worker held
(SIGSTOP) so it cannot answer first — does not stop the round: it completes with the two others.

Also ``--task causal-lm`` on a randomly initialised tiny Llama (tests/tasks/tiny_chat.py):
two SuperNodes, two rounds, checked against the same run in process.

Run with ``pytest -m deployment tests/test_deployment.py`` (~2 minutes on 2 cores).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedpeft.deploy import app, certs, keys
from fedpeft.deploy import launcher as L
from fedpeft.deploy.clientapp_worker import parse_task_line
from fedpeft.federation.message_timing import parse_line

pytestmark = pytest.mark.deployment

CONNECTION = "fedpeft-test"
RUN_CONFIG = ("clients=3 cohort=3 rounds=2 max-client-examples=32 max-test-examples=64 "
              "batch-size=16")
FLWR_RUN_TIMEOUT = 600.0  # the run itself takes ~1.5 min on 2 cores (3-4 min per process per message)
KILLED = "supernode-1"


def _local_dataset(path: Path, rows: int = 300) -> Path:
    """A small csv (text,label) cut from the embedded data: one node's private dataset."""
    from fedpeft.data.embedded import EMBEDDED

    ds = EMBEDDED["rotten-tomatoes"]().shuffle(seed=7).select(range(rows))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(zip(ds["text"], ds["label"]))
    return path


def _wait_for(predicate, timeout: float, what: str, procs: L.Processes, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.snapshot()  # remember Flower's detached children while they live
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _rounds_done(results: Path) -> int:
    try:
        return len(json.loads(results.read_text())["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _tasks(log_text: str) -> list[dict]:
    """The worker's task lines, once per task (a line logged twice counts once)."""
    seen: dict[int, dict] = {}
    for t in map(parse_task_line, log_text.splitlines()):
        if t:
            seen.setdefault(t["task"], t)
    return list(seen.values())


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Loopback:
    """One federation on 127.0.0.1: TLS files, node keys, the app, a private FLWR_HOME."""

    tmp: Path
    tls: certs.TlsFiles
    node_keys: list[keys.NodeKey]
    app_dir: Path
    env: dict[str, str]
    address: str
    procs: L.Processes
    out_dir: Path

    @property
    def results(self) -> Path:
        return self.out_dir / "results.json"

    def start_node(self, i: int, node_config: dict[str, int | str]) -> L.Proc:
        """SuperNode ``supernode-{i}`` (its registered key) with its warm ClientApp worker."""
        return self.procs.start(f"supernode-{i}", L.node_argv(
            superlink=self.address, runtime_port=L.free_port(), ca_cert=self.tls.ca_cert,
            private_key=self.node_keys[i].private, node_config=node_config))

    def flwr_run(self, run_config: str) -> L.Proc:
        """``flwr run`` of the app with ``run_config`` (``output`` added), streaming its log."""
        return self.procs.start("flwr-run", [
            L.flower_bin("flwr"), "run", str(self.app_dir), CONNECTION, "--stream",
            "--run-config", f'{run_config} output="{self.out_dir}"'])


@contextmanager
def loopback(tmp_path: Path, nodes: int, timings: dict[str, float]) -> Iterator[Loopback]:
    """A SuperLink (TLS, node auth) with ``nodes`` keys registered, SuperNodes not yet started;
    on the way out every process is stopped (logs printed if the test failed) and none may
    be left running."""
    t_start = time.monotonic()
    tls = certs.generate(tmp_path / "certs", ["127.0.0.1"])
    node_keys = [keys.generate(tmp_path / "keys", f"supernode-{i}") for i in range(nodes)]
    app_dir = app.write_app(tmp_path / "fedpeft-app")
    flwr_home = tmp_path / "flwr-home"
    env = L.flwr_env(flwr_home)
    env["HF_HOME"] = str(tmp_path / "hf-home")  # datasets' csv cache stays in tmp
    port = L.free_port()
    address = f"127.0.0.1:{port}"
    L.write_connection(flwr_home, CONNECTION, address, tls.ca_cert)
    procs = L.Processes(tmp_path / "logs", env)
    fed = Loopback(tmp_path, tls, node_keys, app_dir, env, address, procs, tmp_path / "run-output")
    try:
        L.start_loopback_superlink(
            procs, port=port, ca_cert=tls.ca_cert, server_cert=tls.server_cert, server_key=tls.server_key,
            public_keys=[k.public for k in node_keys], connection=CONNECTION, env=env, cwd=tmp_path)
        yield fed
    except BaseException:
        procs.snapshot()
        print(procs.logs(tail=150))
        raise
    finally:
        t_stop = time.monotonic()
        procs.stop_all(grace=10.0)
        timings["stop"] = time.monotonic() - t_stop
        timings["total"] = time.monotonic() - t_start
        print("deployment timings (s):", {k: round(v, 1) for k, v in timings.items()})
    assert procs.leftovers() == [], "processes left running"
    assert timings["stop"] < 60


def test_two_rounds_over_tls_with_node_auth_survive_a_killed_node(tmp_path: Path) -> None:
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    with loopback(tmp_path, 3, timings) as fed:
        procs, env, results = fed.procs, fed.env, fed.results
        local_csv = _local_dataset(tmp_path / "node2-data.csv")
        intruder_key = keys.generate(tmp_path / "keys", "intruder")  # never registered

        # An unregistered key is refused: the SuperNode exits on its own, quickly.
        intruder = procs.start("intruder", L.supernode_argv(
            superlink=fed.address, runtime_port=L.free_port(), ca_cert=fed.tls.ca_cert,
            private_key=intruder_key.private,
            node_config={"partition-id": 0, "num-partitions": 3}))

        node_configs: list[dict[str, int | str]] = [
            {"partition-id": i, "num-partitions": 3} for i in range(3)]
        node_configs[2]["dataset-path"] = str(local_csv)  # a node with its own data
        for i, node_config in enumerate(node_configs):
            fed.start_node(i, node_config)

        intruder.popen.wait(timeout=60)
        assert intruder.popen.returncode != 0
        assert "Failed to activate SuperNode" in intruder.log_text()
        timings["setup"] = time.monotonic() - t_start

        run_log = tmp_path / "logs" / "flwr-run.log"
        t_run = time.monotonic()
        run = fed.flwr_run(RUN_CONFIG)

        # Node 1 answers discovery and round 1, then its worker is held (SIGSTOP) so that it
        # cannot answer round 2 before the kill: the node is killed with the message received.
        killed = procs.procs[KILLED]
        _wait_for(lambda: len(_tasks(killed.log_text())) >= 2 or run.popen.poll() is not None,
                  FLWR_RUN_TIMEOUT, "query + round 1 on " + KILLED, procs, poll=0.2)
        workers = [pid for pid in killed.tree if "clientapp_worker" in _cmdline(pid)]
        assert len(workers) == 1, f"expected one worker under {KILLED}: {killed.tree}"
        os.kill(workers[0], signal.SIGSTOP)
        _wait_for(lambda: _rounds_done(results) >= 1 or run.popen.poll() is not None,
                  FLWR_RUN_TIMEOUT, "round 1", procs)
        assert _rounds_done(results) >= 1, "the run ended before round 1 was recorded"
        timings["round 1 done"] = time.monotonic() - t_run
        _wait_for(lambda: killed.log_text().count("Receiving: train message") >= 2
                  or _rounds_done(results) >= 2, 120, "round 2 to reach " + KILLED, procs,
                  poll=0.5)
        assert _rounds_done(results) < 2, "round 2 finished before the node could be killed"
        procs.kill(KILLED)
        timings["killed"] = time.monotonic() - t_run

        remaining = FLWR_RUN_TIMEOUT - (time.monotonic() - t_run)
        _wait_for(lambda: run.popen.poll() is not None, remaining, "flwr run to finish", procs)
        timings["flwr run"] = time.monotonic() - t_run
        assert run.popen.returncode == 0, "flwr run failed"

        record = json.loads(results.read_text())
        assert [r["round"] for r in record["rounds"]] == [1, 2]
        assert record["config"]["clients"] == 3 and record["config"]["rounds"] == 2
        assert record["plan"]["sample_rate"] == 1.0
        for r in record["rounds"]:
            assert r["clients_sampled"] == 3
            assert r["train_loss"] is not None and r["eval_accuracy"] is not None
            assert r["bytes_up"] > 0
        # Round 1: all three uploads; round 2: the two survivors only.
        assert record["rounds"][1]["bytes_up"] < record["rounds"][0]["bytes_up"]
        assert record["final"] is not None and record["final"]["accuracy"] is not None
        assert "round 2: 1 of 3 sampled clients failed" in run_log.read_text()
        # The registered nodes were the federation; the intruder never joined.
        listed = subprocess.run([L.flower_bin("flwr"), "supernode", "ls", CONNECTION,
                                 "--format", "json"], env=env, capture_output=True, text=True,
                                timeout=60, check=True)
        nodes = L._last_json(listed.stdout).get("nodes", [])
        assert len(nodes) == 3, listed.stdout
        # Warm workers: each survivor ran query + 2 trains in one process, built once.
        for name in ("supernode-0", "supernode-2"):
            text = procs.procs[name].log_text()
            assert "Start `flwr-clientapp` process" not in text
            assert [t["kind"] for t in _tasks(text)] == ["query", "train", "train"], name
            trains = [m for m in map(parse_line, text.splitlines()) if m and m["kind"] == "train"]
            assert len(trains) == 2 and "build_data" in trains[0] and "build_data" not in trains[1]
            assert text.count("workspace built #") == 1, name


# --- --task causal-lm --------------------------------------------------------------------

#: the tiny-Llama run of tests/tasks/test_causal_lm_backends.py, on two clients
LM_SETTINGS = {"task": "causal-lm", "clients": 2, "cohort": 2, "rounds": 2, "lr": 0.01,
               "batch-size": 4, "max-client-examples": 0}


def _tiny_llama(root: Path) -> tuple[Path, Path]:
    """(model dir, chats jsonl) of tests/tasks/tiny_chat.py's random 2-layer Llama."""
    sys.path.insert(0, str(Path(__file__).parent / "tasks"))
    from tiny_chat import build_tiny_llama, write_dataset

    return build_tiny_llama(root), write_dataset(root)


def test_a_causal_lm_federation_reports_what_the_inprocess_run_reports(tmp_path: Path) -> None:
    """Two SuperNodes (partitions 0 and 1 of 2) train the tiny Llama for two rounds; the
    run's results.json has the in-process run's clients and bytes, and its train/eval loss
    and perplexity within rel 1e-4 (float summation order: threads, reply order)."""
    from fedpeft.cli import main

    model, data = _tiny_llama(tmp_path / "tiny-lm")
    settings = {**LM_SETTINGS, "model": str(model), "dataset": str(data)}
    # only what the user names: the task's defaults (q_proj,v_proj, max length 128, 64 test
    # chats) must reach the deployed run as they reach `fedpeft simulate --task causal-lm`
    run_config = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}"
                          for k, v in settings.items())
    timings: dict[str, float] = {}
    with loopback(tmp_path, 2, timings) as fed:
        for i in range(2):
            fed.start_node(i, {"partition-id": i, "num-partitions": 2})
        t_run = time.monotonic()
        run = fed.flwr_run(run_config)
        _wait_for(lambda: run.popen.poll() is not None, FLWR_RUN_TIMEOUT, "flwr run to finish",
                  fed.procs)
        timings["flwr run"] = time.monotonic() - t_run
        assert run.popen.returncode == 0, "flwr run failed"
        # flwr run --stream exits 0 even when the ServerApp raised: its results say whether it ran
        assert fed.results.is_file(), "no results.json: the ServerApp failed (see flwr-run.log)"
        for i in range(2):  # each node's warm worker: query + 2 trains, workspace built once
            text = fed.procs.procs[f"supernode-{i}"].log_text()
            assert [t["kind"] for t in _tasks(text)] == ["query", "train", "train"], i
            assert text.count("workspace built #") == 1, i
    deployed = json.loads(fed.results.read_text())

    t_local = time.monotonic()
    local_out = tmp_path / "inprocess"
    argv = [a for k, v in settings.items() for a in (f"--{k}", str(v))]
    assert main(["simulate", *argv, "--backend", "inprocess", "--output", str(local_out)]) == 0
    local = json.loads((local_out / "results.json").read_text())
    timings["inprocess"] = time.monotonic() - t_local
    print("causal-lm timings (s):", {k: round(v, 1) for k, v in timings.items()})

    assert deployed["config"]["task"] == "causal-lm"
    for key in ("model", "dataset", "target_modules", "max_length", "max_test_examples"):
        assert deployed["config"][key] == local["config"][key], key
    assert deployed["config"]["target_modules"] == "q_proj,v_proj"
    assert [r["round"] for r in deployed["rounds"]] == [1, 2]
    for rd, rl in zip(deployed["rounds"], local["rounds"], strict=True):
        for key in ("clients_sampled", "bytes_up", "bytes_down", "clients_failed"):
            assert rd[key] == rl[key], key
        assert rd["clients_sampled"] == 2 and rd["bytes_up"] > 0
        for key in ("train_loss", "eval_loss", "eval_perplexity"):
            assert rd[key] is not None and rd[key] == pytest.approx(rl[key], rel=1e-4), key
    assert deployed["rounds"][1]["eval_loss"] < deployed["rounds"][0]["eval_loss"]  # it trained
    assert deployed["final"]["bytes_up_total"] == local["final"]["bytes_up_total"]
    for key in ("eval_loss", "perplexity"):
        assert deployed["final"][key] == pytest.approx(local["final"][key], rel=1e-4), key
    assert (fed.out_dir / "model" / "adapter_model.safetensors").is_file()
