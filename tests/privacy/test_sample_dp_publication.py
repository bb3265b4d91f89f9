"""Sample-level DP publishes a cohort-independent guarantee (issue 24, finding 7).

The published ε used to be the maximum over the clients that returned and z the minimum: both
were statistics of the secret cohort, and a round in which no sampled client had data (or none
returned) published ε 0.0. Now a run publishes the planned per-client bound: after round t,
the ε of the worst-case client of the run's partition had it trained in every round, and the
smallest z any client trains with — the same numbers whoever was sampled. The clients' own
reports stay in the diagnostics.
"""

from __future__ import annotations

import json
import math

import pytest
from flwr.clientapp import ClientApp

from fedpeft.federation.client_app import app as honest_app
from fedpeft.federation.local_grid import LocalGrid
from fedpeft.engine.privacy_plan import build_privacy
from fedpeft.federation.server import run_federation
from fedpeft.engine.workspace import get_workspace
from fedpeft.privacy.accounting import make_accountant
from fedpeft.privacy.client_accounting import client_noise_plan, planned_client_bound
from fedpeft.privacy.publication import DIAGNOSTICS_FILE
from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve

TINY = dict(backend="inprocess", max_client_examples=16, max_test_examples=32, batch_size=8,
            dp="sample", sample_clip=1.0, delta=1e-3)


def _reference(z, q, steps, participations, delta=1e-3):
    acc = make_accountant("rdp")
    acc.step(z, q, steps * participations)
    return acc.epsilon(delta)


def test_published_epsilon_and_z_do_not_depend_on_who_was_sampled():
    """Two servers of one configuration; in one every round's cohort returned with data, in the
    other no sampled client had any: the same ε after each round (never 0.0) and the same z."""
    cfg = resolve({**TINY, "clients": 8, "cohort": 4, "rounds": 3, "epsilon": 8.0})
    ws = get_workspace(cfg)
    busy, idle = (build_privacy(cfg, ws, 0.5) for _ in range(2))
    eps_busy, eps_idle = [], []
    for t, (m_busy, m_idle) in enumerate([({"epsilon-max": 2.1, "noise-multiplier-min": 1.7}, {}),
                                          ({"epsilon-max": 5.0, "noise-multiplier-min": 1.2}, {}),
                                          ({"epsilon-max": 0.3, "noise-multiplier-min": 3.0}, {})], 1):
        eps_busy.append(busy.observe_round(m_busy, t))
        eps_idle.append(idle.observe_round(m_idle, t))
    assert eps_busy == eps_idle and eps_idle[0] > 0.0
    assert eps_idle == sorted(eps_idle) and eps_idle[-1] <= 8.0
    assert busy.final_fields()["noise_multiplier"] == idle.final_fields()["noise_multiplier"]
    # the numbers are the plan of the run's clients (here all hold 16 examples): z calibrated
    # for 3 rounds of ceil(16 / 8) steps at q = 8 / 16, ε after t rounds of it
    plan = client_noise_plan(16, 8, 1, 3, delta=1e-3, epsilon=8.0)
    assert idle.final_fields()["noise_multiplier"] == plan.noise_multiplier
    for t, eps in enumerate(eps_idle, 1):
        assert eps == pytest.approx(_reference(plan.noise_multiplier, 0.5, plan.steps_per_round, t), rel=1e-12)


def test_planned_bound_is_the_worst_client_size():
    """Sizes 0 (never trains), 3 (q = 1), 9 and 12 (two steps per round: 9 has the larger q)
    and 40: the bound is the largest ε among the kept sizes, z the fixed one."""
    bound = planned_client_bound([0, 3, 9, 12, 40, 9], 8, 1, 5, delta=1e-3, noise_multiplier=1.1)
    assert sorted((c.sample_rate, c.steps_per_round) for c in bound.plans) == [(0.2, 5), (8 / 9, 2), (1.0, 1)]
    for t in (1, 5):
        expect = max(_reference(1.1, q, s, t) for q, s in ((1.0, 1), (8 / 9, 2), (8 / 12, 2), (0.2, 5)))
        assert bound.epsilon_after(t) == pytest.approx(expect, rel=1e-12)
    assert bound.noise_multiplier == 1.1 and bound.epsilon_after(0) == 0.0


def _app(fail_round):
    app = ClientApp()

    @app.query()
    def query(msg, context):
        return honest_app(msg, context)

    @app.train()
    def train(msg, context):
        if int(msg.content["config"]["server-round"]) == fail_round:
            raise RuntimeError("no client returned this round")
        return honest_app(msg, context)

    return app


def test_two_runs_with_different_cohorts_publish_the_same_epsilon_and_z(tmp_path):
    """Run B: every sampled client fails in round 1 (no reply carries an ε). Both runs publish
    the same ε per round — round 1 included, not 0.0 — and the same final (ε, z); the
    clients' own reports are only in B's diagnostics file, null where nobody returned."""
    base = {**TINY, "clients": 4, "cohort": 4, "rounds": 2, "noise_multiplier": 1.0, "diagnostics": True}
    outs = {}
    for name, app in (("A", honest_app), ("B", _app(fail_round=1))):
        cfg = resolve({**base, "output": str(tmp_path / name)})
        outs[name] = run_federation(LocalGrid(app, 4), cfg, [ResultsWriter(cfg.output)])
    a, b = outs["A"], outs["B"]
    assert b.unpublished[0].clients_failed == 4 and a.unpublished[0].clients_failed == 0
    assert [r.epsilon for r in a.rounds] == [r.epsilon for r in b.rounds]
    assert b.rounds[0].epsilon > 0.0 and math.isfinite(b.rounds[1].epsilon)
    assert (a.final.epsilon, a.final.noise_multiplier) == (b.final.epsilon, b.final.noise_multiplier) == \
        (b.rounds[1].epsilon, 1.0)
    # IID, 16 examples each: ε after t rounds of 2 steps at q = 0.5
    assert b.rounds[1].epsilon == pytest.approx(_reference(1.0, 0.5, 2, 2), rel=1e-12)
    published = json.loads((tmp_path / "B" / "results.json").read_text())
    assert all(r["reported_epsilon_max"] is None for r in published["rounds"])
    diag = json.loads((tmp_path / "B" / DIAGNOSTICS_FILE).read_text())
    assert diag["rounds"][0]["reported_epsilon_max"] is None
    assert 0 < diag["rounds"][1]["reported_epsilon_max"] <= b.rounds[1].epsilon
