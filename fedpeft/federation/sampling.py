"""Client discovery and Poisson client sampling.

Poisson sampling (each client independently with rate ``q = cohort / clients``) is what the
user-level DP accountant assumes (SPEC §3.1), so it is used for every run. The draw for round
``t`` comes from the run's cohort stream (:mod:`fedpeft.privacy.randomness`): under DP a secret
key, so nobody can tell who was sampled from the public seed (which would void amplification by
sampling); without DP the seed. Either way a resumed run samples the same clients.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpeft.errors import UsageError
from fedpeft.privacy.randomness import COHORT, RandomStreams


def registration_order(grid: Grid, node_ids: list[int]) -> list[int] | None:
    """Node ids in registration order when the grid is Flower's in-memory simulation grid.

    Flower's simulation engine registers partition ``i`` as the ``i``-th node of its
    in-memory link state, so that order IS the client-id order and the per-node discovery
    messages (one Ray task each, the dominant start-up cost at 1000+ clients) can be skipped.
    Any other grid returns None and discovery asks the nodes. Getting this wrong could only
    change which node a seeded draw picks (reproducibility), never a client's data or state:
    clients key their data and state by their own partition id.
    """
    registry = getattr(getattr(grid, "state", None), "nodes", None)
    if not isinstance(registry, dict):
        return None
    wanted = set(node_ids)
    ordered = [n for n in registry if n in wanted]
    return ordered if len(ordered) == len(node_ids) else None


def discover_clients(grid: Grid, expected: int, timeout: float = 600.0) -> list[int]:
    """Node ids ordered by logical client id (partition id), asked once per run.

    Node ids are random per process; the client id is what data, per-client state and
    reproducible sampling are keyed by.
    """
    deadline = time.monotonic() + timeout
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.2)  # nodes register after the ServerApp starts
        node_ids = sorted(grid.get_node_ids())
    ordered = registration_order(grid, node_ids) if len(node_ids) == expected else None
    if ordered is not None:
        return ordered
    messages = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                for n in node_ids]
    by_client: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            continue
        by_client[int(reply.content["metrics"]["client-id"])] = reply.metadata.src_node_id
    if len(by_client) < expected:
        raise UsageError(f"only {len(by_client)} of {expected} clients answered discovery; "
                         "check that every SuperNode is connected")
    return [by_client[c] for c in sorted(by_client)]


class PoissonSampler:
    """Each client joins round ``t`` independently with probability ``rate``."""

    def __init__(self, node_ids: list[int], rate: float, streams: RandomStreams) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"sampling rate {rate} outside (0, 1]")
        self.node_ids = np.asarray(node_ids, dtype=np.uint64)
        self.rate = rate
        self.streams = streams

    def sample(self, server_round: int) -> list[int]:
        rng = self.streams.numpy(COHORT, server_round)
        mask = rng.random(len(self.node_ids)) < self.rate
        return [int(n) for n in self.node_ids[mask]]
