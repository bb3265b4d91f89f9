"""An in-process Flower :class:`Grid` with one node per client, like a real federation.

Each node has its own ``partition-id``, so the round loop discovers the clients by asking
the nodes (:func:`fedpeft.federation.discovery.discover_clients`), exactly as against a
SuperLink. Tests use it to drive the deployment code path without processes; simulations
use the worker-pool grids of :mod:`fedpeft.federation.virtual_grid` instead. Messages are
delivered sequentially. Like SuperNodes, its nodes hold their own DP policy and state
(:mod:`fedpeft.federation.node_policy`): ``node_config`` adds to every node's config, and the
nodes' ``state-dir`` is a fresh directory under the system's temporary directory (removed
when the process exits) unless given.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.federation.virtual_grid import InMemoryGrid


class LocalGrid(InMemoryGrid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1,
                 node_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(client_app, run_id)
        # node ids deliberately not in partition order: discovery must not rely on it
        ids = [(i * 2654435761 + 12345) % (2**63 - 1) + 1 for i in range(num_nodes)]
        extra = {"state-dir": str(Path(tempfile.gettempdir()) / f"fedpeft-localgrid-{uuid4().hex}"),
                 **(node_config or {})}
        if "state-dir" not in (node_config or {}):  # ours: gone when this process ends
            atexit.register(shutil.rmtree, extra["state-dir"], True)
        self._contexts = {
            nid: Context(run_id=run_id, node_id=nid,
                         node_config={"partition-id": i, "num-partitions": num_nodes, **extra},
                         state=RecordDict(), run_config={})
            for i, nid in enumerate(ids)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def context_for(self, msg: Message) -> Context:
        return self._contexts[msg.metadata.dst_node_id]
