"""Shared benchmark plumbing: process-tree memory/CPU sampling, timers, JSON results.

Memory of a run is measured over its whole process tree, because a Flower simulation is
many processes: the driver (CLI), Ray's gcs_server/raylet/dashboard helpers, and the
``ray::ClientAppActor`` workers that the raylet spawns. Which processes count
(:class:`TreeSampler`):

* every descendant of the root pid (Ray started by ``ray.init`` in the driver forks
  gcs_server and raylet from the driver, and the raylet forks the workers), and
* every process whose environment carries the run's tag variable ``FEDPEFT_BENCH_TAG``
  (set on the subprocess we launch; Ray workers inherit the raylet's environment), which
  catches processes re-parented to init. Other users' Ray clusters on the same host
  (this machine is shared) are thereby excluded — matching on ``ray::`` in the command
  line alone would count them.

Every ``interval`` seconds the sampler sums RSS (``/proc/<pid>/status`` VmRSS via psutil)
and PSS (``/proc/<pid>/smaps_rollup``; shared pages split between the processes that map
them, so the sum does not double-count shared libraries or Ray's shared-memory object
store) over those processes, and keeps the peaks. Summed RSS is the conservative number
(the one the targets are stated in); summed PSS is the closer estimate of real memory use.
CPU seconds of the tree are the larger of two lower bounds: the sum of every sampled
process's OWN user+system time at its last sample, and (in :func:`run_measured`) the
kernel's account of everything reaped through the root (``RUSAGE_CHILDREN`` of this
process across the run: the root plus each descendant its parent waited for). The two are
not added: a child's CPU appears in its own samples AND, once its parent reaps it, in the
parent's children totals. (Until 2026-11-30 the root's children totals were added to the
per-process samples, which counted every child reaped by the root twice — e.g. the
multiprocessing workers of ``bench_overhead``'s plain loop and pfl's torchrun workers.)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TAG_VAR = "FEDPEFT_BENCH_TAG"
GIB = 1024**3
PYTHON = sys.executable


# -- environment ---------------------------------------------------------------------------
def bench_env(extra: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """A subprocess environment with offline settings and a fresh tag (returned too)."""
    tag = uuid.uuid4().hex
    env = dict(os.environ)
    env.update({TAG_VAR: tag, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONWARNINGS": "ignore"})
    env.update(extra or {})
    return env, tag


def machine_info() -> dict[str, Any]:
    import numpy
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname_hash": uuid.uuid5(uuid.NAMESPACE_DNS, platform.node()).hex[:8],
        "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(), "memory_total_gib": round(psutil.virtual_memory().total / GIB, 2),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(), "numpy": numpy.__version__,
        "load_average": os.getloadavg(),
    }
    for name in ("flwr", "ray", "opacus", "peft", "transformers", "psutil"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
            info[name] = None
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_result(name: str, payload: dict[str, Any], out: str | Path | None, quick: bool) -> Path:
    """Write ``payload`` + machine info. Quick runs go to a temp dir unless ``out`` is given."""
    if out is not None:
        path = Path(out)
    elif quick:
        path = Path(tempfile.mkdtemp(prefix="fedpeft-bench-")) / f"{name}.json"
    else:
        path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "quick": quick, "machine": machine_info(), **payload}
    path.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    print(f"-> {path}")
    return path


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


# -- timing --------------------------------------------------------------------------------
@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` then ``t["wall_s"]``, ``t["cpu_s"]`` (this process)."""
    out: dict[str, float] = {}
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["wall_s"] = time.perf_counter() - w0
        out["cpu_s"] = time.process_time() - c0


# -- process tree sampling -----------------------------------------------------------------
def _has_tag(proc: psutil.Process, tag: str) -> bool:
    try:
        return proc.environ().get(TAG_VAR) == tag
    except (psutil.Error, OSError):
        return False


@dataclass
class TreeSampler:
    """Background thread sampling memory and CPU of ``root``'s process tree (see module doc)."""

    root: int
    tag: str | None = None
    interval: float = 0.25
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0
    peak_at_s: float = 0.0
    samples: int = 0
    breakdown_at_peak: dict[str, int] = field(default_factory=dict)
    _cpu: dict[int, float] = field(default_factory=dict)
    _tagged: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def __enter__(self) -> TreeSampler:
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def processes(self) -> list[psutil.Process]:
        procs: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.root)
            procs[root.pid] = root
            for c in root.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            pass
        if self.tag is not None:
            # the environment scan of every process is the costly part (it competes with
            # the measured job on a 2-core host): every 8th sample is enough, since a tagged
            # process outside the tree is a long-lived re-parented one
            if self.samples % 8 == 0:
                for p in psutil.process_iter():
                    if p.pid not in procs and p.pid not in self._tagged and _has_tag(p, self.tag):
                        self._tagged.add(p.pid)
            for pid in list(self._tagged):
                try:
                    procs.setdefault(pid, psutil.Process(pid))
                except psutil.Error:
                    self._tagged.discard(pid)
        return list(procs.values())

    def sample(self) -> None:
        rss = pss = 0
        kinds: dict[str, int] = {}
        procs = self.processes()
        for p in procs:
            try:
                with p.oneshot():
                    mem = p.memory_info().rss
                    try:
                        pss_p = p.memory_full_info().pss
                    except (psutil.Error, AttributeError):
                        pss_p = mem
                    ct = p.cpu_times()
                    name = _kind(p)
            except psutil.Error:
                continue
            rss += mem
            pss += pss_p
            kinds[name] = kinds.get(name, 0) + mem
            # own time only: a reaped child's time also lands in its parent's children
            # totals, so adding those would count it twice (see the module doc)
            self._cpu[p.pid] = ct.user + ct.system
        self.samples += 1
        if rss > self.peak_rss:
            self.peak_rss, self.breakdown_at_peak = rss, kinds
            self.peak_at_s = time.perf_counter() - self._t0
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values())

    def summary(self) -> dict[str, Any]:
        return {"peak_rss_bytes": self.peak_rss, "peak_rss_gib": self.peak_rss / GIB,
                "peak_pss_bytes": self.peak_pss, "peak_pss_gib": self.peak_pss / GIB,
                "peak_processes": self.peak_procs, "peak_at_s": self.peak_at_s,
                "rss_by_kind_at_peak_gib": {k: v / GIB for k, v in sorted(self.breakdown_at_peak.items())},
                "tree_cpu_s": self.cpu_s, "samples": self.samples, "interval_s": self.interval}


def _kind(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline()[:2])
    except psutil.Error:
        cmd = ""
    if "ray::" in cmd:
        return cmd.split()[0]
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if key in cmd:
            return key
    return "driver" if "fedpeft" in cmd or "bench" in cmd else (p.name() if p.is_running() else "?")


def run_measured(cmd: Sequence[str], *, env: dict[str, str], tag: str, cwd: str | Path = REPO,
                 log: Path | None = None, interval: float = 0.25, timeout: float | None = None) -> dict[str, Any]:
    """Run ``cmd`` as a subprocess; return wall time, exit code and its tree's peaks."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        reaped0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(list(cmd), env=env, cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT)
        with TreeSampler(proc.pid, tag, interval) as sampler:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # stop the whole tree (Ray's raylet and workers too), by pid, then the root
                stragglers = [p for p in sampler.processes() if p.pid != proc.pid]
                proc.kill()
                code = proc.wait()
                for p in stragglers:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
            sampler.sample()
        wall = time.perf_counter() - t0
        reaped1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        if log:
            out.close()
    reaped = (reaped1.ru_utime - reaped0.ru_utime) + (reaped1.ru_stime - reaped0.ru_stime)
    summary = sampler.summary()
    sampled = summary["tree_cpu_s"]
    return {"cmd": list(cmd), "returncode": code, "wall_s": wall, "load_average_before": load0,
            "load_average_after": os.getloadavg(), **summary,
            "tree_cpu_s": max(sampled, reaped), "tree_cpu_s_sampled": sampled, "tree_cpu_s_reaped": reaped}


def assert_positive(doc: dict[str, Any], keys: Sequence[str]) -> None:
    """Smoke-test helper: every dotted key exists and is a positive number."""
    for key in keys:
        value: Any = doc
        for part in key.split("."):
            value = value[part]
        if not (isinstance(value, (int, float)) and value > 0):
            raise AssertionError(f"{key} = {value!r} is not a positive number")
