"""A warm ClientApp executor: one long-lived process runs every ClientApp message of a node.

Why it exists: Flower 1.42 runs every ClientApp message in a fresh ``flwr-clientapp`` process,
whatever the SuperNode's ``--isolation``: with ``subprocess`` the SuperNode's own SuperExec
launches it, with ``process`` an external ``flower-superexec`` does, through the same
``SubprocessExecutor`` (``flwr/supercore/superexec/executor/``); 1.42's warm executors exist
only for Kubernetes and for AgentApp/model/connector tasks. Each fresh process re-imports
torch, transformers and peft and rebuilds the workspace (model + tokenised data) — most of a
round's time on a small machine (``benchmarks/bench_deploy_startup.py``).

This process takes the place of ``flower-superexec`` next to a SuperNode started with
``--isolation process``: it acquires the node's ClientApp tasks from the SuperNode's Runtime
API and runs each one here, in the steps ``flwr-clientapp`` takes
(``flwr/supernode/runtime/run_clientapp.py``): heartbeat, pull the task input, install the
FAB, load its ClientApp, call it, push the reply, push the task's status and context. One
difference: a message object that is not in the SuperNode's store yet is polled for after
50 ms rather than 1 s (:data:`PULL_INITIAL_BACKOFF_S`). The
ClientApp's per-process caches (``fedpeft/engine/workspace.py``) then live across
messages, and the heavy libraries are imported once, at start-up, before the first task.

Whose code runs: the ClientApp comes from the run's FAB, as with Flower's executor. Python
cannot unload modules, so a task from a *different* FAB makes this process re-execute itself
(same PID, fresh interpreter) and run that task first — its claim token is handed over on the
command line, as Flower hands it to ``flwr-clientapp``. For the same reason this module
imports nothing from fedpeft and drops the ``fedpeft`` package modules ``python -m`` loaded
before the first FAB is imported: otherwise an installed fedpeft would shadow the FAB's.

Messages are handled one at a time (the SuperNode hands out one message at a time anyway).
A task that raises gets an error reply, as in Flower; the worker keeps serving.

    python -m fedpeft.deploy.clientapp_worker --runtime-api-address 127.0.0.1:9094 [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from logging import DEBUG, ERROR, INFO, WARNING
from typing import Any

#: libraries imported before the first task (each fresh flwr-clientapp paid for them per
#: message): the ML stack, flwr_datasets (its package import pulls matplotlib, seaborn and
#: scipy.stats: ≈ 2.4 s), opacus (sample-level DP), and Flower's ClientApp runtime
PRELOAD = ("torch", "transformers", "peft", "datasets", "numpy", "flwr_datasets", "opacus",
           "flwr.supernode.runtime.run_clientapp", "flwr.cli.install", "flwr.clientapp.utils")
#: The Flower release this worker was written and tested against. It leans on Flower internals
#: that carry no compatibility promise: the non-public modules in :data:`FLOWER_INTERNALS`, the
#: Runtime API RPCs in :data:`RUNTIME_RPCS`, and it mirrors the Flower functions in
#: :data:`MIRRORED` (``_pull_task_input`` is a copy of ``pull_task_input`` with a shorter first
#: backoff; ``Worker.run_task``, ``_retry_invoker`` and ``_heartbeat_fn`` follow the other
#: three). Any other version is refused at start-up (:func:`flower_version_problem`); moving
#: to a new one means re-reading those functions, updating the copies and the AST digests
#: below (``tests/deploy/test_worker_flower_pin.py`` recomputes them) and this pin.
from fedpeft.federation.flower_internals import TESTED_FLOWER, installed_flower  # noqa: E402 - one pin
FLOWER_INTERNALS = (
    "flwr.cli.install", "flwr.clientapp.client_app", "flwr.clientapp.utils", "flwr.common.constant",
    "flwr.common.serde", "flwr.proto.node_pb2", "flwr.proto.runtime_pb2", "flwr.supercore.app_utils",
    "flwr.supercore.constant", "flwr.supercore.heartbeat",
    "flwr.supercore.inflatable.inflatable_protobuf_utils",
    "flwr.supercore.inflatable.inflatable_utils", "flwr.supercore.interceptors",
    "flwr.supercore.retry", "flwr.supercore.runtime", "flwr.supercore.task_identity",
    "flwr.supernode.runtime.run_clientapp")
RUNTIME_RPCS = ("AcquireTask", "PullTaskInput", "PullMessages", "PullObject",
                "ConfirmMessageReceived", "SendTaskHeartbeat")
#: ``module:function`` -> SHA-256 of ``ast.dump`` of its source in :data:`TESTED_FLOWER`
MIRRORED = {
    "flwr.supernode.runtime.run_clientapp:pull_task_input":
        "46727a4b8f0928ded7d65f9d1503f671202ee5d093c49dae7968a4f4c3076b54",
    "flwr.supernode.runtime.run_clientapp:run_clientapp":
        "202038e9f03e7736ef96239261207bfa6f19b483da43312391c16f620f772913",
    "flwr.supercore.retry.http_retry:make_simple_http_retry_invoker":
        "2ddad49765fab7b96069a6c3372df1e4d7a1fe4aa2f86da99892d929f4fcfd84",
    "flwr.supercore.heartbeat:make_task_heartbeat_fn_http":
        "9e3812322ae562a29f4262d563c278afb7870c26041beb8ad766269eea5e611c",
}


def flower_version_problem(found: str | None = None) -> str | None:
    """One line saying why this worker must not run on the installed Flower, or None."""
    found = installed_flower() if found is None else found
    if found == TESTED_FLOWER:
        return None
    return (f"fedpeft warm ClientApp worker: tested with flwr {TESTED_FLOWER} only, found flwr "
            f"{found} (it uses Flower internals that change between releases); start the node "
            "with `--clientapp subprocess` (Flower's own process per message) instead")


#: log markers (the deployment test and ``benchmarks/bench_deploy_startup.py`` read them)
ACQUIRED = "fedpeft worker acquired task"
TASK_LINE = "fedpeft worker task"
_TASK_RE = re.compile(r"fedpeft worker task (\d+) (\w+): (.*)$")
_NUMBER = re.compile(r"([a-z_]+) ([0-9.]+) s")


def parse_task_line(line: str) -> dict[str, Any] | None:
    """``{"task": id, "kind": "train", "pull": s, "load": s, "handler": s, "push": s,
    "total": s}`` from one :meth:`Worker.run_task` log line, else None."""
    m = _TASK_RE.search(line)
    if m is None:
        return None
    out: dict[str, Any] = {"task": int(m.group(1)), "kind": m.group(2)}
    out.update({k: float(v) for k, v in _NUMBER.findall(m.group(3))})
    return out


def _retry_invoker(max_time: float | None):  # noqa: ANN202 - flwr's RetryInvoker
    """Flower's HTTP retry policy without its process-killing branches.

    ``make_simple_http_retry_invoker`` (what ``flwr-clientapp`` uses) sends SIGINT to its own
    process on HTTP 401: right for a one-message process, fatal for a long-lived one. Here a
    non-retryable HTTP status fails the current task only.
    """
    import httpx
    from flwr.common.constant import MAX_RETRY_DELAY
    from flwr.supercore.retry import RetryInvoker, exponential

    retryable = {httpx.codes.BAD_GATEWAY, httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT}

    def give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in retryable

    return RetryInvoker(lambda: exponential(max_delay=MAX_RETRY_DELAY),
                        (httpx.TransportError, httpx.HTTPStatusError), max_tries=None,
                        max_time=max_time, should_giveup=give_up)


def _heartbeat_fn(client):  # noqa: ANN001, ANN202 - RuntimeHttpClient -> Callable[[], bool]
    """Task heartbeat that never signals this process (Flower's raises SIGINT when the task is
    gone); a gone task is logged and its reply will be refused by the SuperNode."""
    import httpx
    from flwr.common import log
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    warned = False

    def fn() -> bool:
        nonlocal warned
        try:
            ok = client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError:
            ok = False
        if not ok and not warned:
            warned = True
            log(WARNING, "fedpeft worker: the SuperNode no longer knows this task (stopped run?)")
        return True

    return fn


#: first wait (s) when a message object is not in the SuperNode's store yet. Flower waits 1 s
#: (PULL_INITIAL_BACKOFF), but the SuperNode creates the task before it has downloaded the
#: message body from the SuperLink, and a warm worker claims the task within its poll
#: interval: with 1 s, nearly every message paid a full second here.
PULL_INITIAL_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 1.0


def _pull_task_input(client):  # noqa: ANN001, ANN202 - (Message, Context, Run, Fab)
    """``flwr.supernode.runtime.run_clientapp.pull_task_input`` with a short first backoff
    for objects that are still arriving (:data:`PULL_INITIAL_BACKOFF_S`)."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.app import Message
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_INITIAL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


@dataclass
class Worker:
    """Acquire and run ClientApp tasks of one SuperNode, forever (see the module docstring)."""

    runtime_api_address: str
    root_certificates: str | None = None  # PEM file of the Runtime API's CA; None: plain HTTP
    poll_interval: float = 0.2
    #: argv that restarts this worker (without ``--token``): used to switch FABs
    restart_argv: list[str] = field(default_factory=list)
    fab_hash: str | None = None
    _app: Any = None
    _control: Any = None

    def _client(self, token: str | None, max_time: float | None):  # noqa: ANN202
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(
            component_name="flwr-clientapp" if token else "SuperExec")]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address, insecure=self.root_certificates is None,
            root_certificates=self.root_certificates, interceptors=interceptors,
            retry_invoker=_retry_invoker(max_time))

    def acquire(self) -> tuple[str, str] | None:
        """Claim the oldest pending ClientApp task: (token, FAB hash), or None."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        if self._control is None:
            self._control = self._client(None, max_time=None)
        res = self._control.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            from flwr.common import log

            log(INFO, "%s %d (FAB %s)", ACQUIRED, res.task.task_id, res.task.fab_hash[:12])
            return res.token, res.task.fab_hash
        return None

    def serve(self, first_token: str | None = None) -> None:
        """Run tasks as they come; ``first_token`` is a task claimed before a re-exec."""
        if first_token is not None:
            self.run_task(first_token)
        while True:
            claimed = self.acquire()
            if claimed is None:
                time.sleep(self.poll_interval)
                continue
            token, fab_hash = claimed
            if self.fab_hash is not None and fab_hash and fab_hash != self.fab_hash:
                self._reexec(token, fab_hash)
            self.run_task(token)

    def _reexec(self, token: str, fab_hash: str) -> None:
        """Become a fresh worker (same PID) that runs ``token``'s task first."""
        from flwr.common import log

        log(INFO, "fedpeft worker: task of another FAB (%s): restarting with fresh modules", fab_hash[:12])
        sys.stdout.flush()
        sys.stderr.flush()
        argv = [*self.restart_argv, "--token", token]
        os.execv(argv[0], argv)

    def _load(self, run: Any, fab: Any) -> Any:
        """The FAB's ClientApp: installed and imported once per FAB hash."""
        if self._app is not None and fab.hash_str == self.fab_hash:
            return self._app
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn

        _forget_own_package()
        install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self._app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash = fab.hash_str
        return self._app

    def run_task(self, token: str) -> str:
        """One ClientApp task, as ``flwr-clientapp`` runs it; returns its sub-status."""
        from flwr.app import Error, Message
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common import log
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        t0 = time.perf_counter()
        laps: dict[str, float] = {}
        client = self._client(token, max_time=120.0)
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        heartbeat.start()
        message = context = reply = None
        kind = "unknown"
        task_id = -1
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = _pull_task_input(client)
            from flwr.supercore.task_identity import TaskIdentity

            task_id = int(TaskIdentity.task_id or -1)
            kind = str(message.metadata.message_type).split(".")[0] or "unknown"
            laps["pull"] = time.perf_counter() - t0
            app = self._load(run, fab)
            laps["load"] = time.perf_counter() - t0 - laps["pull"]
            t_handler = time.perf_counter()
            reply = app(message=message, context=context)
            laps["handler"] = time.perf_counter() - t_handler
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - a failing task is an error reply, as in Flower
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            t_push = time.perf_counter()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                log(ERROR, "fedpeft worker: failed to push the reply", exc_info=ex)
                status = SubStatus.FAILED
            push_task_output(client, context, status, details)
            laps["push"] = time.perf_counter() - t_push
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        laps["total"] = time.perf_counter() - t0
        log(INFO, "%s %d %s: %s", TASK_LINE, task_id, kind,
            " | ".join(f"{k} {v:.2f} s" for k, v in laps.items()) + f" | status {status}")
        return str(status)


def _forget_own_package() -> None:
    """Drop ``fedpeft`` modules that ``python -m fedpeft.deploy...`` imported (package
    ``__init__`` files only: this module imports nothing else of fedpeft), so that the FAB's
    fedpeft — first on ``sys.path`` once the FAB is installed — is the one imported."""
    for name in [n for n in sys.modules if n == "fedpeft" or n.startswith("fedpeft.")]:
        del sys.modules[name]


def preload(modules: tuple[str, ...] = PRELOAD) -> dict[str, float]:
    """Import the heavy libraries now, so no message pays for them; seconds per module."""
    out: dict[str, float] = {}
    for name in modules:
        t = time.perf_counter()
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        out[name] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedpeft.deploy.clientapp_worker",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--runtime-api-address", required=True,
                    help="the SuperNode's Runtime API (its --port), e.g. 127.0.0.1:9094")
    ap.add_argument("--root-certificates", default=None,
                    help="CA of a TLS Runtime API (SuperNode --ssl-*); default plain HTTP (loopback)")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    ap.add_argument("--poll-interval", type=float, default=0.2, help="seconds between task polls")
    ap.add_argument("--no-preload", action="store_true", help="do not import torch & co. up front")
    ap.add_argument("--token", default=None, help=argparse.SUPPRESS)  # a claimed task (re-exec)
    args = ap.parse_args(argv)
    problem = flower_version_problem()
    if problem is not None:
        print(problem, file=sys.stderr, flush=True)
        return 2

    from flwr.common import log
    from flwr.supercore.app_utils import start_parent_process_monitor

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # SIGINT when the node goes away
    raw = sys.argv[1:] if argv is None else list(argv)
    restart = [sys.executable, "-m", "fedpeft.deploy.clientapp_worker", *_without_token(raw)]
    t = time.perf_counter()
    loaded = {} if args.no_preload else preload()
    # opacus calls logging.basicConfig on import: a root handler that would print every Flower
    # line twice; Flower's logger has its own console handler
    logging.getLogger("flwr").propagate = False
    log(INFO, "fedpeft worker (pid %d) ready for %s after %.1f s (preloaded %s)", os.getpid(),
        args.runtime_api_address, time.perf_counter() - t, ", ".join(loaded) or "nothing")
    log(DEBUG, "preload seconds: %s", loaded)
    worker = Worker(args.runtime_api_address, args.root_certificates, args.poll_interval, restart)
    try:
        worker.serve(args.token)
    except KeyboardInterrupt:
        return 0
    return 0


def _without_token(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--token":
            skip = True
            continue
        if a.startswith("--token="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
