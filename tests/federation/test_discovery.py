"""Client discovery: registration order fast path and the query fallback agree."""

from __future__ import annotations

from types import SimpleNamespace

from fedpeft.federation.client_app import app
from fedpeft.federation.local_grid import LocalGrid
from fedpeft.federation.sampling import PoissonSampler, discover_clients, registration_order
from fedpeft.privacy.randomness import SecretStreams, SeededStreams


def test_query_discovery_orders_nodes_by_client_id():
    grid = LocalGrid(app, 7)
    ordered = discover_clients(grid, 7, timeout=30)
    by_node = {nid: ctx.node_config["partition-id"] for nid, ctx in grid._contexts.items()}  # noqa: SLF001
    assert [by_node[n] for n in ordered] == list(range(7))
    assert registration_order(grid, ordered) is None  # not an in-memory link state: must query


def test_registration_order_used_when_available():
    ids = [50, 3, 99, 7]  # registration order, not sorted
    fake = SimpleNamespace(state=SimpleNamespace(nodes={i: object() for i in ids}))
    assert registration_order(fake, sorted(ids)) == ids
    assert registration_order(fake, [3, 7, 50]) == [50, 3, 7]  # online subset keeps registration order
    assert registration_order(fake, [3, 4]) is None  # a node the registry does not know: query instead


def test_poisson_sampler_rate_and_round_determinism():
    s = PoissonSampler(list(range(1, 10001)), 0.05, SeededStreams(3))
    a, b = s.sample(4), s.sample(4)
    assert a == b and s.sample(5) != a
    # Binomial(10000, 0.05): mean 500, sd ~21.8
    assert abs(len(a) - 500) < 5 * 21.8


def test_secret_cohort_is_not_the_seeded_one_and_keeps_the_rate():
    """Under DP the cohort comes from a secret key: the seeded draw (what a holder of --seed
    computes) does not predict it, and a fresh key gives a fresh cohort."""
    nodes = list(range(1, 10001))
    public = PoissonSampler(nodes, 0.05, SeededStreams(0)).sample(1)
    key = SecretStreams.fresh()
    secret = PoissonSampler(nodes, 0.05, key).sample(1)
    assert secret != public and PoissonSampler(nodes, 0.05, SecretStreams.fresh()).sample(1) != secret
    assert PoissonSampler(nodes, 0.05, key).sample(1) == secret  # same key: same cohort (resume)
    # overlap of two independent Poisson(0.05) cohorts ~ Binomial(10000, 0.0025): mean 25, sd 5
    assert len(set(secret) & set(public)) < 25 + 6 * 5
    assert abs(len(secret) - 500) < 5 * 21.8
