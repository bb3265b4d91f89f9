"""Where one ClientApp message's time goes: phase laps the handler logs, one line per message.

In deployment a message runs either in a fresh ``flwr-clientapp`` process (Flower's default,
which re-imports torch and rebuilds the workspace every time) or in the node's warm executor
(:mod:`fedpeft.deploy.clientapp_worker`). The line says how old the process was when the
handler started (a fresh process: interpreter, Flower, FAB install and app import) and how
long imports, the workspace, training and the reply took, so a deployment's own logs answer
"where did the round go" — ``benchmarks/bench_deploy_startup.py`` parses them.

The line is logged at INFO when ``FEDPEFT_MESSAGE_TIMING`` is set (the deployment launcher
sets it) and at DEBUG otherwise: a simulation sends thousands of messages. A DP run logs no
such line at all (:func:`logs_message_lines`): it names the client and the round, i.e. who was
sampled, and in simulation every client shares the driver's stderr.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

#: the marker ``benchmarks/bench_deploy_startup.py`` and the deployment test look for
LINE_PREFIX = "fedpeft message"
ENV_VAR = "FEDPEFT_MESSAGE_TIMING"
_NUMBER = re.compile(r"([a-z_]+) ([0-9.]+) s")


def log_level() -> int:
    return logging.INFO if os.environ.get(ENV_VAR, "") not in ("", "0") else logging.DEBUG


def logs_message_lines(cfg: Any) -> bool:
    """Whether a ClientApp message of the run ``cfg`` (a RunConfig) may log its timing line:
    never under DP (``--dp user|sample``, or a budget that implies it). The line names the
    client and the round, so in a simulation (all clients in one process tree, one stderr) the
    lines spell out every round's secret Poisson cohort and its realised size; neither is
    published by a DP run (SPEC §3.4). A client is told (``RunConfig.private``): a user-level
    DP run sends it no DP setting."""
    return not cfg.private


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class PhaseClock:
    """Consecutive laps from construction: ``lap("imports")``, ``lap("workspace")``, ..."""

    def __init__(self) -> None:
        self.age_at_start = process_age_s()
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
        return self.laps[name]

    def line(self, kind: str, detail: str = "") -> str:
        """``fedpeft message train client 1 round 2: age 0.4 s | imports 0.00 s | ...``"""
        age = "n/a" if self.age_at_start is None else f"{self.age_at_start:.2f} s"
        laps = " | ".join(f"{k} {v:.2f} s" for k, v in self.laps.items())
        return f"{LINE_PREFIX} {kind}{' ' + detail if detail else ''}: process age {age} | {laps}"


def parse_line(line: str) -> dict[str, float | str] | None:
    """The numbers of one :meth:`PhaseClock.line`, else None: ``kind``, ``process_age``,
    each lap, and ``build_<phase>`` when the message built the workspace."""
    at = line.find(LINE_PREFIX)
    if at < 0 or ": process age " not in line:
        return None
    head, _, rest = line[at + len(LINE_PREFIX):].partition(": process age ")
    out: dict[str, float | str] = {"kind": head.split()[0]}
    if "workspace built #" in head:
        out.update({f"build_{k}": float(v) for k, v in _NUMBER.findall(head.split("workspace built #", 1)[1])})
    age = rest.split(" | ", 1)[0].split()[0]
    if age != "n/a":
        out["process_age"] = float(age)
    out.update({k: float(v) for k, v in _NUMBER.findall(rest.split(" | ", 1)[1] if " | " in rest else "")})
    return out
