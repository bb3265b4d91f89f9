"""Who trains in a round (Poisson sampling of logical client ids) and where it runs (rosters).

Poisson sampling (each client independently with rate ``q = cohort / clients``) is what the
user-level DP accountant assumes (SPEC §3.1), so it is used for every run. It is drawn in
O(cohort), not O(clients): first the cohort size ``K ~ Binomial(N, q)``, then ``K`` distinct
ids uniformly — the same distribution as N independent coin flips (given its size, a
Bernoulli(q) subset is a uniform subset of that size). The draw for round ``t`` comes from the
run's cohort stream (:mod:`fedpeft.privacy.randomness`): under DP a secret key, so nobody can
tell who was sampled from the public seed (which would void amplification by sampling);
without DP the seed. Either way a resumed run samples the same clients.

A :class:`Roster` maps a logical client id to the Flower node that serves it. In simulation
a fixed pool of worker nodes serves any number of logical clients (:class:`WorkerPool`); in
a real federation each SuperNode is one client (:class:`NodePerClient`, found by asking the
nodes once per run). Either way every message names its client (``client-id`` in the
message's config), so data, per-client state and seeds stay keyed by the logical id.
"""

from __future__ import annotations

import time
from logging import WARNING
from typing import Protocol

from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedpeft.errors import UsageError
from fedpeft.privacy.randomness import COHORT, RandomStreams


class Roster(Protocol):
    """Where each logical client's messages go."""

    def node_of(self, client_id: int) -> int:
        """The Flower node id that runs ``client_id``'s ClientApp."""


class WorkerPool:
    """Simulation: ``len(workers)`` nodes serve every logical client, round-robin."""

    def __init__(self, workers: list[int]) -> None:
        if not workers:
            raise ValueError("a worker pool needs at least one node")
        self.workers = list(workers)

    def node_of(self, client_id: int) -> int:
        return self.workers[client_id % len(self.workers)]


class NodePerClient:
    """Real federation: node ``nodes[i]`` is client ``i`` (see :func:`discover_clients`)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = list(nodes)

    def node_of(self, client_id: int) -> int:
        return self.nodes[client_id]


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


class PoissonSampler:
    """Each of ``num_clients`` logical clients joins round ``t`` independently with
    probability ``rate``; :meth:`sample` costs O(cohort), not O(clients)."""

    def __init__(self, num_clients: int, rate: float, streams: RandomStreams) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"sampling rate {rate} outside (0, 1]")
        if num_clients < 1:
            raise ValueError(f"{num_clients} clients; need at least 1")
        self.num_clients = num_clients
        self.rate = rate
        self.streams = streams

    def sample(self, server_round: int) -> list[int]:
        """The sorted logical client ids of round ``server_round``."""
        rng = self.streams.numpy(COHORT, server_round)
        size = int(rng.binomial(self.num_clients, self.rate))
        # numpy's Generator.choice without replacement uses a set-based draw for small
        # samples of large populations: O(size) time and memory
        return sorted(int(c) for c in rng.choice(self.num_clients, size=size, replace=False))


class Cohorts:
    """The strategy's client sampler: this round's ``(client id, node id)`` pairs."""

    def __init__(self, sampler: PoissonSampler, roster: Roster) -> None:
        self.sampler = sampler
        self.roster = roster

    def sample(self, server_round: int) -> list[tuple[int, int]]:
        return [(c, self.roster.node_of(c)) for c in self.sampler.sample(server_round)]
