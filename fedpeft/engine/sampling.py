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
nodes once per run by :func:`fedpeft.federation.discovery.discover_clients`). Either way
every message names its client (``client-id`` in the message's config), so data, per-client
state and seeds stay keyed by the logical id.
"""

from __future__ import annotations

from typing import Protocol

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
    """Real federation: node ``nodes[i]`` is client ``i`` (see :func:`fedpeft.federation.discovery.discover_clients`)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = list(nodes)

    def node_of(self, client_id: int) -> int:
        return self.nodes[client_id]


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
