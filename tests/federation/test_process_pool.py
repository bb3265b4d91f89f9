"""The forked worker pool (``--backend processes``): workers are separate processes that
inherit the driver's workspace instead of building their own, run messages concurrently,
survive a crashing client, and give the same run as the in-process backend."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading

import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.federation.process_pool import ProcessPoolGrid

probe = ClientApp()
#: set in the driver before the pool forks: a worker sees it only by inheriting memory
INHERITED: dict[str, int] = {}
#: a two-party rendezvous made before any pool forks (its workers inherit it): two messages
#: both pass it only if they run at the same time
MEETING = multiprocessing.get_context("fork").Barrier(2)
MEET_TIMEOUT_S = 30.0


@probe.train()
def _train(msg: Message, context):  # noqa: ANN001, ANN202
    what = str(msg.content["config"]["what"])
    if what == "die":
        os._exit(3)  # a client process killed mid-message (OOM killer, segfault)
    if what == "raise":
        raise ValueError("client bug")
    if what == "meet":  # wait (bounded) for the other message's worker to arrive
        try:
            MEETING.wait(timeout=MEET_TIMEOUT_S)
            met = 1
        except threading.BrokenBarrierError:
            met = 0
        return Message(RecordDict({"metrics": MetricRecord({"pid": os.getpid(), "met": met})}), reply_to=msg)
    if what == "scan":  # look for the driver's secret key, as code running in a worker could
        config = msg.content["config"]
        return Message(RecordDict({"metrics": MetricRecord({
            "pid": os.getpid(), "key-objects": _secret_objects(),
            "key-copies": _memory_copies(bytes(config["head"]), bytes(config["tail"]))})}), reply_to=msg)
    return Message(RecordDict({"metrics": MetricRecord({
        "pid": os.getpid(), "client": int(context.node_config["partition-id"]),
        "inherited": INHERITED.get("marker", -1)})}), reply_to=msg)


def _secret_objects() -> int:
    """Live SecretStreams objects in this process that still hold a key."""
    import gc

    from fedpeft.privacy.randomness import SecretStreams

    gc.unfreeze()  # the pool froze what existed when it forked: list those objects too
    return sum(1 for o in gc.get_objects() if isinstance(o, SecretStreams) and getattr(o, "_key", None))


def _memory_copies(head: bytes, tail: bytes) -> int:
    """How often ``head + tail`` (a 32-byte key sent as two halves, so the message itself never
    holds it whole) occurs in this process' writable memory, read through /proc/self/mem."""
    found = 0
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if len(fields) < 2 or not fields[1].startswith("rw") or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            at = data.find(head)
            while at >= 0:
                found += data[at + len(head):at + len(head) + len(tail)] == tail
                at = data.find(head, at + 1)
    return found


def _msgs(grid: ProcessPoolGrid, whats: list[str]) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({"client-id": c, "what": w})}),
                    dst_node_id=grid.roster().node_of(c), message_type=MessageType.TRAIN)
            for c, w in enumerate(whats)]


@pytest.fixture
def grid():
    INHERITED["marker"] = 1234
    g = ProcessPoolGrid(probe, num_clients=100, num_workers=2)
    yield g
    g.close()


def test_workers_are_forked_processes_that_inherit_the_drivers_memory(grid):
    replies = list(grid.send_and_receive(_msgs(grid, ["ok"] * 4), timeout=60))
    metrics = [r.content["metrics"] for r in replies]
    pids = {int(m["pid"]) for m in metrics}
    assert os.getpid() not in pids and pids <= set(grid.worker_pids())
    assert {int(m["inherited"]) for m in metrics} == {1234}
    assert sorted(int(m["client"]) for m in metrics) == [0, 1, 2, 3]  # the message's logical client


def test_two_workers_run_messages_at_the_same_time(grid):
    """Each message waits for the other at a rendezvous: run one after the other, the first
    would give up after MEET_TIMEOUT_S and break it for the second (both report met = 0)."""
    MEETING.reset()
    replies = list(grid.send_and_receive(_msgs(grid, ["meet", "meet"]), timeout=2 * MEET_TIMEOUT_S + 30))
    metrics = [r.content["metrics"] for r in replies]
    assert [int(m["met"]) for m in metrics] == [1, 1]
    pids = {int(m["pid"]) for m in metrics}
    assert len(pids) == 2 and pids <= set(grid.worker_pids())


def test_a_crashing_client_is_an_error_reply_and_the_pool_keeps_its_size(grid):
    before = set(grid.worker_pids())
    replies = list(grid.send_and_receive(_msgs(grid, ["raise", "die"]), timeout=60))
    assert len(replies) == 2 and all(r.has_error() for r in replies)
    reasons = sorted(r.error.reason.split(":")[0] for r in replies)
    assert reasons == ["ValueError", "WorkerDied"]
    after = set(grid.worker_pids())
    assert len(after) == 2 and len(after - before) == 1  # the dead worker was replaced
    replies = list(grid.send_and_receive(_msgs(grid, ["ok"] * 3), timeout=60))
    assert not any(r.has_error() for r in replies)


def test_close_stops_every_worker():
    g = ProcessPoolGrid(probe, num_clients=4, num_workers=2)
    procs = list(g._all)  # noqa: SLF001
    template = g._template.process  # noqa: SLF001
    g.close()
    assert all(not w.alive for w in procs) and not template.is_alive()


@pytest.mark.parametrize("run", ["fresh", "resumed"])
def test_no_worker_holds_the_servers_key_not_even_a_replacement_forked_mid_run(run, tmp_path):
    """Issue 24 #8: a fresh run draws its key after the pool exists; a resumed run loads its
    checkpoint before (the CLI does), but the key file is read on first use, after the pool
    forked; a worker that dies is replaced by a fork of the pool's template (built before the
    key), not of the driver as it is mid-run. Checked as code in a worker would: live key
    objects, and the key's bytes anywhere in its writable memory. The driver itself is the
    positive control."""
    from fedpeft.privacy.randomness import COHORT, SecretStreams

    if run == "resumed":
        SecretStreams.fresh().save(tmp_path)
        streams = SecretStreams.load(tmp_path)  # fedpeft simulate --resume: load_checkpoint first
    g = ProcessPoolGrid(probe, num_clients=10, num_workers=2)
    try:
        if run == "fresh":
            streams = SecretStreams.fresh()  # what run_federation does after the pool is built
        streams.numpy(COHORT, 1)
        key = streams._key  # noqa: SLF001
        head, tail = key[:16], key[16:]
        assert _secret_objects() >= 1 and _memory_copies(head, tail) >= 1  # the driver holds it
        before = set(g.worker_pids())
        assert [r.has_error() for r in g.send_and_receive(_msgs(g, ["die"]), timeout=60)] == [True]
        replaced = set(g.worker_pids()) - before
        assert len(replaced) == 1
        msgs = [Message(RecordDict({"config": ConfigRecord({"client-id": c, "what": "scan", "head": head,
                                                            "tail": tail})}),
                        dst_node_id=g.roster().node_of(c), message_type=MessageType.TRAIN) for c in range(4)]
        replies = [r.content["metrics"] for r in g.send_and_receive(msgs, timeout=120)]
        assert replaced <= {int(m["pid"]) for m in replies}  # the replacement was asked too
        assert [(int(m["key-objects"]), int(m["key-copies"])) for m in replies] == [(0, 0)] * 4
    finally:
        g.close()


def test_a_run_on_the_pool_matches_the_inprocess_backend(tmp_path):
    """Same clients, examples, bytes and accuracy as running every client in the driver; only
    float summation order differs (1 thread per worker vs all cores in process)."""
    from fedpeft.cli import main

    common = ["--clients", "12", "--cohort", "4", "--rounds", "2", "--max-client-examples", "16",
              "--max-test-examples", "64", "--batch-size", "8", "--seed", "5"]
    runs = {}
    for backend in ("processes", "inprocess"):
        out = tmp_path / backend
        assert main(["simulate", "--backend", backend, *common, "--output", str(out)]) == 0
        runs[backend] = json.loads((out / "results.json").read_text())
    a, b = runs["processes"], runs["inprocess"]
    assert a["config"]["backend"] == "processes"
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        for key in ("clients_sampled", "bytes_up", "bytes_down", "eval_accuracy"):
            assert ra[key] == rb[key], key
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["eval_loss"] == pytest.approx(rb["eval_loss"], rel=1e-4)


def test_auto_backend_is_the_pool_on_one_linux_machine_and_ray_for_a_cluster(monkeypatch):
    from fedpeft.backends import choose_backend
    from fedpeft.settings import resolve

    assert choose_backend(None, "linux") == "processes"
    assert choose_backend("10.0.0.1:6379", "linux") == "ray"
    assert choose_backend(None, "darwin") == "ray"  # fork is unsafe with macOS system libraries
    assert choose_backend(None, "linux", cpus_per_client=2) == "ray"  # multi-threaded clients
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve({}).backend == choose_backend(None)  # results.json records what ran
    assert resolve({"backend": "inprocess"}).backend == "inprocess"


def test_multi_threaded_clients_are_refused_on_the_pool():
    """A forked worker that opens an OpenMP region after the driver used one hangs (libgomp's
    thread team does not survive fork): refused up front, with what to use instead."""
    from fedpeft.errors import UsageError
    from fedpeft.settings import resolve

    with pytest.raises(UsageError, match=r"--cpus-per-client 2(\.0)? is invalid.*--backend ray or inprocess"):
        resolve({"backend": "processes", "cpus_per_client": 2})
    assert resolve({"backend": "processes", "cpus_per_client": 0.5}).backend == "processes"
