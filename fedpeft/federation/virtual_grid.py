"""Simulation grids where a fixed pool of workers serves any number of logical clients.

Flower's simulation engine registers one SuperNode per simulated client and its in-memory
link state scans every stored message once per node on each 0.1 s poll: start-up is O(N)
and dispatch O(nodes × messages), which capped fedpeft near 10k clients. Here the grid's
nodes are the workers themselves (one per Ray actor, or one in-process worker), the server
names the logical client in every train message (``client-id``, see
:mod:`fedpeft.engine.sampling`), and the grid runs the ClientApp with that client's
identity as node config (``partition-id`` = client id, ``num-partitions`` = N). Nothing is
registered per client: start-up is independent of N and a round costs O(cohort).

:class:`RayGrid` runs messages on Flower's own Ray backend (``flwr[simulation]``'s actor
pool, sized from the Ray cluster's resources), so a local Ray instance and a multi-machine
Ray cluster (``--ray-address``) work the same way. :class:`InProcessGrid` runs them one after
another in this process (``--backend inprocess``: debugging, small runs, fast tests).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from abc import abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import uuid4

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedpeft.federation.flower_internals import new_run, ray_backend, stamp_message
from fedpeft.federation.messages import CLIENT_ID_KEY
from fedpeft.federation.node_policy import POLICY_KEY, RUN_POLICY
from fedpeft.engine.sampling import WorkerPool
from fedpeft.threads import IN_PROCESS_KEY

if TYPE_CHECKING:
    from flwr.supercore.run import Run

#: Flower's error code for "the ClientApp raised"
_CLIENT_EXCEPTION = 2


class InMemoryGrid(Grid):
    """Flower's Grid API over messages delivered in this process: message bookkeeping for the
    simulation grids here and the node-per-client test grid (``local_grid.py``). Subclasses
    say which nodes exist and which Context a message runs in; by default a message runs
    through ``client_app`` at once. It does what Flower's runtime would (the run, the task
    identity, message ids): Flower internals, behind a version guard (``flower_internals.py``)."""

    def __init__(self, client_app: ClientApp | None, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = new_run(run_id)  # refuses an untested Flower
        self._replies: dict[str, Message] = {}
        self._lock = threading.Lock()

    @abstractmethod
    def context_for(self, msg: Message) -> Context:
        """The Context ``msg`` runs in (its node's identity)."""

    # -- Flower Grid API ---------------------------------------------------------------
    def set_run(self, run_id: int) -> None:  # pragma: no cover - the run is fixed
        pass

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = str(uuid4())
            stamp_message(msg, mid, run_id=self._run.run_id)
            self._submit(mid, msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        self._wait(ids, timeout)
        return self.pull_messages(ids)

    # -- delivery --------------------------------------------------------------------
    def _store(self, mid: str, reply: Message) -> None:
        with self._lock:
            self._replies[mid] = reply

    @staticmethod
    def _error_reply(msg: Message, exc: BaseException) -> Message:
        reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        return Message(Error(code=_CLIENT_EXCEPTION, reason=reason), reply_to=msg)

    def _submit(self, mid: str, msg: Message) -> None:
        """Run ``msg`` (here: at once, in this process); store its reply under ``mid``."""
        assert self.client_app is not None
        try:
            reply = self.client_app(msg, self.context_for(msg))
        except Exception as exc:  # noqa: BLE001 - a failing client is a reply with an error
            reply = self._error_reply(msg, exc)
        self._store(mid, reply)

    def _wait(self, ids: list[str], timeout: float | None) -> None:
        """Block until every reply in ``ids`` is stored or ``timeout`` seconds passed."""


class VirtualClientGrid(InMemoryGrid):
    """A Grid of ``num_workers`` worker nodes serving ``num_clients`` logical clients."""

    #: node config every message gets besides the client's identity
    node_extra: ClassVar[dict[str, Any]] = {}
    #: simulated clients are the simulator's own: the run's config is their DP policy
    #: (a deployed node's comes from its node config: fedpeft/federation/node_policy.py)
    node_policy: ClassVar[dict[str, Any]] = {POLICY_KEY: RUN_POLICY}

    def __init__(self, client_app: ClientApp | None, num_clients: int, num_workers: int,
                 run_id: int = 1) -> None:
        if num_workers < 1:
            raise ValueError(f"{num_workers} workers; need at least 1")
        super().__init__(client_app, run_id)
        self.num_clients = num_clients
        self._workers = list(range(1, num_workers + 1))

    def roster(self) -> WorkerPool:
        """Route every logical client to a worker (any free worker actually runs it)."""
        return WorkerPool(self._workers)

    def close(self) -> None:
        """Release workers (Ray actors); the grid is unusable afterwards."""

    def get_node_ids(self) -> Iterable[int]:
        return list(self._workers)

    def context_for(self, msg: Message) -> Context:
        """The logical client's identity as node config; no state survives between messages
        (fedpeft keeps per-client state in files keyed by client id)."""
        config = msg.content["config"] if "config" in msg.content else {}
        if msg.metadata.message_type == MessageType.EVALUATE:  # central evaluation: no client
            return Context(run_id=self._run.run_id, node_id=msg.metadata.dst_node_id,
                           node_config={"partition-id": -1, "num-partitions": self.num_clients,
                                        **self.node_policy, **self.node_extra},
                           state=RecordDict(), run_config={})
        if CLIENT_ID_KEY not in config:
            raise ValueError(f"a {msg.metadata.message_type} message without '{CLIENT_ID_KEY}': a "
                             "virtual-client grid only runs messages that name their client")
        client = int(config[CLIENT_ID_KEY])
        if not 0 <= client < self.num_clients:
            raise ValueError(f"client id {client} outside 0..{self.num_clients - 1}")
        return Context(run_id=self._run.run_id, node_id=msg.metadata.dst_node_id,
                       node_config={"partition-id": client, "num-partitions": self.num_clients,
                                    **self.node_policy, **self.node_extra},
                       state=RecordDict(), run_config={})


class InProcessGrid(VirtualClientGrid):
    """Every message runs in this process, one after another (no Ray); ``num_workers`` only
    names more worker nodes (tests of routing and sharded evaluation). Its clients run alone
    in this process: they (and evaluation) get every core (:mod:`fedpeft.threads`)."""

    node_extra = {IN_PROCESS_KEY: True}

    def __init__(self, client_app: ClientApp, num_clients: int, num_workers: int = 1) -> None:
        super().__init__(client_app, num_clients, num_workers=num_workers)


class PooledGrid(VirtualClientGrid):
    """Messages run concurrently on a pool of workers, one dispatch thread per worker; a round
    that stops waiting (``timeout``) drops the late replies. Subclasses say how one message
    runs on a worker (:meth:`_execute`)."""

    def __init__(self, num_clients: int, num_workers: int) -> None:
        super().__init__(None, num_clients, num_workers=num_workers)
        self._executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="fedpeft-client")
        self._futures: dict[str, Future[None]] = {}
        #: ids of messages whose round stopped waiting: their late replies are dropped
        self._abandoned: set[str] = set()

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @abstractmethod
    def _execute(self, msg: Message, context: Context) -> Message:
        """Run ``msg`` in ``context`` on a free worker; its reply (raise on failure)."""

    def _submit(self, mid: str, msg: Message) -> None:
        self._futures[mid] = self._executor.submit(self._run_one, mid, msg)

    def _run_one(self, mid: str, msg: Message) -> None:
        try:
            reply = self._execute(msg, self.context_for(msg))
        except Exception as exc:  # noqa: BLE001 - a failing client is a reply with an error
            reply = self._error_reply(msg, exc)
        stamp_message(reply, str(uuid4()))
        self._store(mid, reply)

    def _wait(self, ids: list[str], timeout: float | None) -> None:
        waiting = {self._futures.pop(mid): mid for mid in ids if mid in self._futures}
        pending = set(waiting)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            if not done and left == 0.0:
                break  # late replies are dropped: those clients count as failed
        with self._lock:
            self._abandoned.update(m for f, m in waiting.items() if f in pending and m not in self._replies)

    def _store(self, mid: str, reply: Message) -> None:
        with self._lock:
            if mid in self._abandoned:  # arrived after its round gave up on it
                self._abandoned.discard(mid)
                return
            self._replies[mid] = reply

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class RayGrid(PooledGrid):
    """Messages run on Flower's Ray backend: an actor pool sized by the cluster's resources
    (``client_resources``), each actor keeping one workspace for every client it serves."""

    def __init__(self, client_app: ClientApp, num_clients: int, backend_config: dict[str, Any]) -> None:
        self._backend = ray_backend(backend_config)  # refuses an untested Flower
        self._backend.build(_app_factory(client_app))
        workers = self._backend.num_workers
        if workers < 1:
            raise RuntimeError(f"the Ray cluster has no room for one client "
                               f"(client_resources {backend_config.get('client_resources')})")
        super().__init__(num_clients, workers)

    def _execute(self, msg: Message, context: Context) -> Message:
        reply, _ = self._backend.process_message(msg, context)
        return reply

    def close(self) -> None:
        super().close()
        self._backend.terminate()


def _app_factory(client_app: ClientApp) -> Callable[[], ClientApp]:
    # Ray pickles this with the actor call: a module-level function of a module-level app
    return lambda: client_app


def loopback_ray() -> None:
    """Keep a local Ray instance on 127.0.0.1 (Ray otherwise binds the machine's interface
    address and advertises it). Only for a Ray instance this process starts: a driver that
    joins a cluster must advertise a reachable address. Ray reads this switch when it is
    imported; if it already was, the constant it was read into is set too. A user's own
    setting of the variable wins."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False")
