"""How many torch threads a ClientApp message gets, and idle torch threads that do not spin.

* A client in a Ray actor (or a SuperNode's process) shares the machine with the other
  actors: it gets ``cpus_per_client`` threads, the CPUs Ray reserved for it.
* A client that runs inside the driver (``--backend inprocess``: clients one after another,
  then the central evaluation, in one process) has the process' cores to itself: it gets all
  of them (``os.sched_getaffinity``), and so does the evaluation after it. The in-process grid
  says so in the node config it gives each message (:data:`IN_PROCESS_KEY`); the run's
  ``backend`` setting is server-only and never reaches a client.

torch's OpenMP runtime (libgomp) by default keeps idle threads spinning at every barrier; when
another process holds one of the two cores of a shared machine, a 2-thread op then waits for a
thread that is not running while its partner burns the other core: measured on the 2-core
host under one competing process, 4 clients' training took 41–118 s with 2 spinning threads,
12–14 s with 2 passive ones and 11–12 s with 1 (benchmarks/README.md, peer benchmark).
:func:`passive_omp_wait` makes idle threads sleep; libgomp reads the setting when torch is
loaded, so the CLI calls it before anything imports torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig

WAIT_POLICY_VAR = "OMP_WAIT_POLICY"
#: node-config key the in-process grid sets: this client runs alone inside the driver process
IN_PROCESS_KEY = "in-process"


def passive_omp_wait() -> None:
    """Idle OpenMP threads sleep instead of spinning (a user's own setting wins). Effective
    only before torch is imported in this process; inherited by its subprocesses."""
    os.environ.setdefault(WAIT_POLICY_VAR, "PASSIVE")


#: where Linux exposes this process' CPU quota (cgroup v2 ``cpu.max``; v1 ``cpu.cfs_*``)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """CPUs the cgroup quota allows (``docker run --cpus 2``, a Kubernetes CPU limit), rounded
    up; None without a quota. The affinity mask does not show a quota: a container limited to
    2 CPUs on a 64-core host still sees 64, and 64 workers would then share 2 CPUs."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
        v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1_quota.is_file() and v1_period.is_file():
            quota_us, period_us = int(v1_quota.read_text()), int(v1_period.read_text())
            return None if quota_us <= 0 or period_us <= 0 else max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):  # unreadable or not the format above: no limit known
        return None
    return None


def process_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask (``cpu_count`` where there is none), capped
    by a cgroup CPU quota (:func:`cgroup_cpu_limit`)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit(cgroup_root)
    return cores if limit is None else min(cores, limit)


def client_threads(cfg: RunConfig, node_config: Mapping[str, Any]) -> int:
    """torch threads for one client (or evaluation) message of ``cfg``'s run on a node with
    ``node_config``: every core in process, else the CPUs reserved per client."""
    if node_config.get(IN_PROCESS_KEY):
        return process_cores()
    return max(1, int(cfg.cpus_per_client))
