"""Client discovery (real federation) and O(cohort) Poisson sampling of logical client ids."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import stats

from fedpeft.federation.client_app import app
from fedpeft.federation.local_grid import LocalGrid
from fedpeft.errors import UsageError
from fedpeft.engine.sampling import Cohorts, PoissonSampler, WorkerPool
from fedpeft.federation.discovery import discover_clients
from fedpeft.privacy.randomness import SecretStreams, SeededStreams


def test_query_discovery_orders_nodes_by_client_id():
    grid = LocalGrid(app, 7)
    roster = discover_clients(grid, 7, timeout=30)
    by_node = {nid: ctx.node_config["partition-id"] for nid, ctx in grid._contexts.items()}  # noqa: SLF001
    assert [by_node[roster.node_of(c)] for c in range(7)] == list(range(7))


def test_discovery_names_the_missing_clients():
    with pytest.raises(UsageError, match=r"only 7 of 9 clients.*missing e.g. \[7, 8\]"):
        discover_clients(LocalGrid(app, 7), 9, timeout=0.5)


def test_poisson_sampler_rate_and_round_determinism():
    s = PoissonSampler(10000, 0.05, SeededStreams(3))
    a, b = s.sample(4), s.sample(4)
    assert a == b and s.sample(5) != a
    # Binomial(10000, 0.05): mean 500, sd ~21.8
    assert abs(len(a) - 500) < 5 * 21.8


def test_secret_cohort_is_not_the_seeded_one_and_keeps_the_rate():
    """Under DP the cohort comes from a secret key: the seeded draw (what a holder of --seed
    computes) does not predict it, and a fresh key gives a fresh cohort."""
    nodes = 10000
    public = PoissonSampler(nodes, 0.05, SeededStreams(0)).sample(1)
    key = SecretStreams.fresh()
    secret = PoissonSampler(nodes, 0.05, key).sample(1)
    assert secret != public and PoissonSampler(nodes, 0.05, SecretStreams.fresh()).sample(1) != secret
    assert PoissonSampler(nodes, 0.05, key).sample(1) == secret  # same streams: same cohort
    # overlap of two independent Poisson(0.05) cohorts ~ Binomial(10000, 0.0025): mean 25, sd 5
    assert len(set(secret) & set(public)) < 25 + 6 * 5
    assert abs(len(secret) - 500) < 5 * 21.8


def test_poisson_marginals_match_independent_coin_flips():
    """Count-then-ids is Poisson sampling: over many rounds every client's inclusion rate is q
    (chi-square against Binomial(rounds, q) per client) and the cohort size is Binomial(N, q)."""
    n, q, rounds = 200, 0.1, 2000
    s = PoissonSampler(n, q, SeededStreams(11))
    hits = np.zeros(n)
    sizes = []
    for r in range(1, rounds + 1):
        ids = s.sample(r)
        assert ids == sorted(set(ids)) and all(0 <= c < n for c in ids)  # distinct, in range
        hits[ids] += 1
        sizes.append(len(ids))
    # per-client inclusion counts ~ Binomial(2000, 0.1): mean 200, var 180
    chi2 = float(((hits - rounds * q) ** 2 / (rounds * q * (1 - q))).sum())
    assert stats.chi2.sf(chi2, df=n) > 1e-3
    # cohort sizes: mean N q = 20, variance N q (1-q) = 18
    assert abs(np.mean(sizes) - n * q) < 5 * np.sqrt(n * q * (1 - q) / rounds)
    assert 18 * 0.8 < np.var(sizes) < 18 * 1.2
    # pairwise independence: two fixed clients are sampled together at rate q^2
    both = sum(1 for r in range(1, rounds + 1) if {0, 1} <= set(s.sample(r)))
    assert abs(both - rounds * q * q) < 5 * np.sqrt(rounds * q * q)


def test_sampling_a_million_clients_costs_the_cohort_not_n():
    """O(cohort): 1M clients at q = 2e-5 draw ~20 ids; the draw allocates nothing of size N."""
    import tracemalloc

    s = PoissonSampler(1_000_000, 2e-5, SeededStreams(0))
    tracemalloc.start()
    ids = s.sample(1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 0 < len(ids) < 60
    assert peak < 100_000  # an O(N) mask would be >= 1 MB


def test_worker_pool_routes_every_client_and_names_it():
    cohorts = Cohorts(PoissonSampler(50, 0.5, SeededStreams(1)), WorkerPool([7, 9]))
    pairs = cohorts.sample(3)
    assert pairs and all(node == (7 if c % 2 == 0 else 9) for c, node in pairs)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _flwr_lines():
    handler = _Lines()
    logging.getLogger("flwr").addHandler(handler)
    return handler


def test_a_second_node_claiming_a_bound_client_id_is_refused_and_logged():
    """Attacker: an authenticated node answers discovery with another node's partition-id. The
    id stays bound to the node that claimed it first; the second claimer is refused (no slot,
    never messaged) and the refusal is logged. (Before: the last reply took the slot.)"""
    grid = LocalGrid(app, 4)
    ids = sorted(grid._contexts)  # noqa: SLF001 - messages go out (and replies come back) in this order
    for client, node in enumerate(ids[:3]):
        grid._contexts[node].node_config["partition-id"] = client  # noqa: SLF001
    owner, rogue, victim = ids[0], ids[3], 0
    grid._contexts[rogue].node_config["partition-id"] = victim  # noqa: SLF001 - answers second
    logged = _flwr_lines()
    try:
        roster = discover_clients(grid, 3, timeout=30)
    finally:
        logging.getLogger("flwr").removeHandler(logged)
    assert roster.node_of(victim) == owner
    assert rogue not in roster.nodes
    assert any(f"node {rogue} claims client {victim}, already bound to node {owner}" in line
               and "refused" in line for line in logged.lines), logged.lines


def test_a_node_claiming_an_id_outside_the_federation_is_refused_and_the_run_goes_on():
    grid = LocalGrid(app, 4)
    rogue = max(grid._contexts, key=lambda n: grid._contexts[n].node_config["partition-id"])  # noqa: SLF001
    grid._contexts[rogue].node_config["partition-id"] = 99  # noqa: SLF001
    logged = _flwr_lines()
    try:
        roster = discover_clients(grid, 3, timeout=30)
    finally:
        logging.getLogger("flwr").removeHandler(logged)
    assert rogue not in roster.nodes and len(roster.nodes) == 3
    assert any(f"node {rogue} claims client 99, outside 0..2" in line for line in logged.lines)
