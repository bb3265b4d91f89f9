"""An in-process Flower :class:`Grid` with one node per client, like a real federation.

Each node has its own ``partition-id``, so the round loop discovers the clients by asking
the nodes (:func:`fedpeft.federation.sampling.discover_clients`), exactly as against a
SuperLink. Tests use it to drive the deployment code path without processes; simulations
use the worker-pool grids of :mod:`fedpeft.federation.virtual_grid` instead. Messages are
delivered sequentially.
"""

from __future__ import annotations

import itertools
import time
import traceback
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.serverapp import Grid

_ERROR_CODE_CLIENT_EXCEPTION = 2


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        # Flower's runtimes set the process' task identity; Message() reads it
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = run_id
        # node ids deliberately not in partition order: discovery must not rely on it
        ids = [(i * 2654435761 + 12345) % (2**63 - 1) + 1 for i in range(num_nodes)]
        self._contexts = {
            nid: Context(run_id=run_id, node_id=nid,
                         node_config={"partition-id": i, "num-partitions": num_nodes},
                         state=RecordDict(), run_config={})
            for i, nid in enumerate(ids)
        }
        self._outbox: dict[str, Message] = {}
        self._counter = itertools.count()

    def set_run(self, run: Run) -> None:  # pragma: no cover - the run is fixed
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = str(uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            msg.metadata.__dict__["_created_at"] = time.time()
            self._outbox[mid] = self._deliver(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._outbox.pop(mid) for mid in list(message_ids) if mid in self._outbox]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message:
        context = self._contexts[msg.metadata.dst_node_id]
        try:
            return self.client_app(msg, context)
        except Exception as exc:  # noqa: BLE001 - a failing client is a reply with an error
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            return Message(Error(code=_ERROR_CODE_CLIENT_EXCEPTION, reason=reason), reply_to=msg)
