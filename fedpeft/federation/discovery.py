"""Which Flower node is which logical client, asked of a real federation's nodes once per run."""

from __future__ import annotations

import time
from logging import WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedpeft.engine.sampling import NodePerClient
from fedpeft.errors import UsageError


def discover_clients(grid: Grid, expected: int, timeout: float = 600.0) -> NodePerClient:
    """Ask every connected node which logical client it is (once per run).

    Node ids are random per process; the client id (the node's ``partition-id``) is what
    data, per-client state and reproducible sampling are keyed by. Each client id is bound to
    one node — the SuperLink authenticated it (SuperNode authentication) — for the whole run:
    a second node claiming a bound id, or a node claiming an id outside ``0..expected-1``, is
    refused (it gets no message of this run) and logged, never silently swapped in.
    """
    deadline = time.monotonic() + timeout
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.2)  # nodes register after the ServerApp starts
        node_ids = sorted(grid.get_node_ids())
    messages = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                for n in node_ids]
    by_client: dict[int, int] = {}
    refused: list[str] = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            continue
        node = reply.metadata.src_node_id
        try:
            claim = int(reply.content["metrics"]["client-id"])
        except (KeyError, TypeError, ValueError):
            claim = -1
        if not 0 <= claim < expected:
            refused.append(f"node {node} claims client {claim}, outside 0..{expected - 1}")
        elif claim in by_client and by_client[claim] != node:
            refused.append(f"node {node} claims client {claim}, already bound to node "
                           f"{by_client[claim]}")
        else:
            by_client[claim] = node
            continue
        log(WARNING, "discovery: %s: refused (it takes no part in this run)", refused[-1])
    if sorted(by_client) != list(range(expected)):
        missing = sorted(set(range(expected)) - set(by_client))[:5]
        raise UsageError(f"only {len(by_client)} of {expected} clients answered discovery "
                         f"(missing e.g. {missing}); check that every SuperNode is connected "
                         "and has a distinct partition-id in 0..clients-1"
                         + (f"; refused: {'; '.join(refused[:3])}" if refused else ""))
    return NodePerClient([by_client[c] for c in range(expected)])
