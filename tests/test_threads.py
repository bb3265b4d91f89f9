"""Torch threads per client message, and the CLI's OpenMP wait policy (fedpeft/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedpeft.config import RunConfig
from fedpeft.threads import IN_PROCESS_KEY, cgroup_cpu_limit, client_threads, process_cores


@pytest.mark.parametrize("cpus, expected", [(1.0, 1), (2.0, 2), (0.5, 1), (3.7, 3)])
def test_a_ray_or_deployed_client_gets_the_cpus_reserved_for_it(cpus, expected):
    assert client_threads(RunConfig(cpus_per_client=cpus), {"partition-id": 3, "num-partitions": 10}) == expected


#: prints what a process reports as its cores and an in-process client's threads
CORES_PROBE = ("from fedpeft.config import RunConfig; from fedpeft.threads import IN_PROCESS_KEY, "
               "client_threads, process_cores; "
               "print(process_cores(), client_threads(RunConfig(cpus_per_client=1.0), "
               "{'partition-id': 3, 'num-partitions': 10, IN_PROCESS_KEY: True}))")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
@pytest.mark.parametrize("allowed", [1, 2])
def test_an_inprocess_client_gets_every_core_the_process_may_run_on(allowed):
    """A process pinned to ``allowed`` CPUs (as ``taskset`` or a container's cpuset does) reports
    that many cores, and its in-process client gets that many threads, whatever the machine has."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < allowed:
        pytest.skip(f"this process may run on {len(cpus)} CPU(s) only")
    pinned = set(cpus[:allowed])
    out = subprocess.run([sys.executable, "-c", CORES_PROBE], capture_output=True, text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, pinned)).stdout.split()
    assert out == [str(allowed), str(allowed)]


def test_without_an_affinity_mask_the_cores_are_the_cpu_count(monkeypatch, tmp_path):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert process_cores(tmp_path) == 6  # tmp_path: a cgroup root without a quota
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable": still one thread
    assert process_cores(tmp_path) == 1


def test_an_unreadable_affinity_mask_falls_back_to_the_cpu_count(monkeypatch, tmp_path):
    def refuse(pid):  # noqa: ANN001, ANN202
        raise OSError("sched_getaffinity: operation not permitted")

    monkeypatch.setattr(os, "sched_getaffinity", refuse)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert process_cores(tmp_path) == 3


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, docker run --cpus 2
    ({"cpu.max": "150000 100000\n"}, 2),  # --cpus 1.5: rounded up, a thread for the half CPU
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),  # no quota
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage"}, None),
    ({}, None),
])
def test_a_cgroup_cpu_quota_caps_the_cores(monkeypatch, tmp_path, files, limit):
    """A container limited to 2 CPUs on a 64-core host sees all 64 in its affinity mask; the
    quota, not the mask, says how many workers and threads can run."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert process_cores(tmp_path) == (64 if limit is None else limit)


def test_only_the_inprocess_grid_marks_its_nodes():
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedpeft.federation.client_app import app
    from fedpeft.federation.messages import CLIENT_ID_KEY
    from fedpeft.federation.virtual_grid import InProcessGrid, VirtualClientGrid

    grid = InProcessGrid(app, 5)  # sets the task identity a Message needs
    msg = Message(RecordDict({"config": ConfigRecord({CLIENT_ID_KEY: 2})}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    assert grid.context_for(msg).node_config[IN_PROCESS_KEY] is True
    assert IN_PROCESS_KEY not in VirtualClientGrid.node_extra  # Ray actors: cpus_per_client


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return {**env, **extra}


PROBE = ("import os, sys; import fedpeft.cli; loaded = 'torch' in sys.modules; import torch; "
         "print(loaded, os.environ.get('OMP_WAIT_POLICY'))")


def test_the_cli_makes_idle_openmp_threads_sleep_before_torch_loads():
    # libgomp reads OMP_WAIT_POLICY once, when torch loads it: the CLI must set it first
    out = subprocess.run([sys.executable, "-c", PROBE], env=_cli_env(), capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "PASSIVE"]


def test_a_users_own_wait_policy_wins():
    out = subprocess.run([sys.executable, "-c", PROBE], env=_cli_env(OMP_WAIT_POLICY="ACTIVE"),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "ACTIVE"]
