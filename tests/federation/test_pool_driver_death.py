"""A driver that dies without closing its pool (SIGKILL, SIGTERM, OOM kill) leaves no
template or worker process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

DRIVER = textwrap.dedent("""
    import sys, time
    from fedpeft.federation.process_pool import ProcessPoolGrid
    grid = ProcessPoolGrid(lambda msg, ctx: None, num_clients=4, num_workers=2)
    print(grid.template_pid, *grid.worker_pids(), flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_pool_processes_end_with_their_driver(sig):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        driver.send_signal(sig)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in pids if _alive(p)]
        for p in left:  # do not leak them into the rest of the suite
            os.kill(p, signal.SIGKILL)
        assert not left, f"still running after the driver died: {left} (template first)"
    finally:
        driver.kill()
