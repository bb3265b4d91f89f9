"""One participant as one process tree: a SuperNode and its warm ClientApp worker.

    python -m fedpeft.deploy.node --runtime-api-address 127.0.0.1:9094 -- \\
        flower-supernode ... --port 9094 --isolation process

Why a supervisor: with ``--isolation process`` a SuperNode runs no ClientApp itself; its
tasks wait for an executor (:mod:`fedpeft.deploy.clientapp_worker`) to claim them. Started
together here, the two live and die together — stopping or killing this process tree takes
the whole node, as with a plain ``flower-supernode`` — and a crashed worker (out of memory,
say) is restarted while the SuperNode stays connected; its in-flight task fails like a
crashed ``flwr-clientapp`` would. Both children write to this process' stdout/stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from types import FrameType

#: a worker that dies this soon after starting, this many times in a row, is not restarted
QUICK_DEATH_S = 30.0
MAX_QUICK_DEATHS = 5


def worker_argv(runtime_api_address: str, parent_pid: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedpeft.deploy.clientapp_worker",
            "--runtime-api-address", runtime_api_address, "--parent-pid", str(parent_pid), *extra]


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedpeft.deploy.node", description=__doc__.splitlines()[0])
    ap.add_argument("--runtime-api-address", required=True,
                    help="the SuperNode's Runtime API, where the worker claims tasks")
    ap.add_argument("--worker-arg", action="append", default=[],
                    help="extra argument for the worker (repeatable), e.g. --worker-arg=--no-preload")
    ap.add_argument("supernode", nargs=argparse.REMAINDER,
                    help="-- then the flower-supernode command (with --isolation process)")
    args = ap.parse_args(argv)
    supernode_cmd = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode
    if not supernode_cmd:
        ap.error("missing the flower-supernode command after --")
    if "--isolation" not in supernode_cmd or \
            supernode_cmd[supernode_cmd.index("--isolation") + 1:][:1] != ["process"]:
        ap.error("the SuperNode must run with --isolation process (the worker executes its tasks)")
    from fedpeft.deploy.clientapp_worker import flower_version_problem

    problem = flower_version_problem()
    if problem is not None:  # before the SuperNode joins: it would wait for a worker forever
        print(problem, file=sys.stderr, flush=True)
        return 2

    stopping = False

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    supernode = subprocess.Popen(supernode_cmd)
    worker = subprocess.Popen(worker_argv(args.runtime_api_address, os.getpid(), args.worker_arg))
    started, quick_deaths = time.monotonic(), 0
    code = 0
    try:
        while not stopping:
            if supernode.poll() is not None:
                code = supernode.returncode
                print(f"fedpeft node: SuperNode exited with {code}; stopping its worker", flush=True)
                break
            if worker.poll() is not None:
                quick_deaths = quick_deaths + 1 if time.monotonic() - started < QUICK_DEATH_S else 1
                if quick_deaths >= MAX_QUICK_DEATHS:
                    print(f"fedpeft node: worker died {quick_deaths} times within {QUICK_DEATH_S:.0f} s "
                          "of starting; stopping the node", flush=True)
                    code = 1
                    break
                print(f"fedpeft node: worker exited with {worker.returncode}; restarting it", flush=True)
                time.sleep(1.0)
                worker = subprocess.Popen(worker_argv(args.runtime_api_address, os.getpid(), args.worker_arg))
                started = time.monotonic()
            time.sleep(0.2)
    finally:
        _stop(worker)
        _stop(supernode)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
