"""fedpeft.privacy.accounting: Opacus accountants behind a small interface (SPEC §3.1, §3.3).

Every expectation comes from outside the code under test: Google's dp-accounting
(RDP and PLD) on the same event sequence, or the check values of STACK.md.
"""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant as GoogleRdp

from fedpeft.errors import UsageError
from fedpeft.privacy.accounting import ACCOUNTANTS, RDP_ORDERS, make_accountant


def google_rdp_epsilon(events: list[tuple[float, float, int]], delta: float) -> float:
    acc = GoogleRdp(orders=list(RDP_ORDERS))
    for z, q, n in events:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n))
    return acc.get_epsilon(delta)


def google_pld_epsilon(events: list[tuple[float, float, int]], delta: float) -> float:
    acc = PLDAccountant(value_discretization_interval=1e-3)
    for z, q, n in events:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
    return acc.get_epsilon(delta)


def test_registry_offers_rdp_and_prv_and_rejects_unknown_names():
    assert ACCOUNTANTS.names() == ["prv", "rdp"]
    with pytest.raises(UsageError, match="allowed: prv, rdp"):
        make_accountant("moments")


def test_rdp_orders_reach_at_least_256():
    assert max(RDP_ORDERS) >= 256 and min(RDP_ORDERS) > 1


@pytest.mark.parametrize("events,delta", [
    ([(0.7092, 1e-3, 1000)], 1e-6),                     # STACK.md check value
    ([(1.48, 0.1, 20)], 1e-5),                          # 1000 clients, cohort 100, 20 rounds
    ([(1.1, 0.01, 300), (0.9, 0.02, 50)], 1e-5),        # heterogeneous sequence
])
def test_rdp_epsilon_matches_google_dp_accounting_within_5_percent(events, delta):
    acc = make_accountant("rdp")
    for z, q, n in events:
        acc.step(z, q, num_steps=n)
    ours, theirs = acc.epsilon(delta), google_rdp_epsilon(events, delta)
    assert ours == pytest.approx(theirs, rel=0.05)


def test_prv_epsilon_matches_google_pld_within_5_percent():
    events = [(0.6079, 1e-3, 1000)]
    acc = make_accountant("prv")
    acc.step(*events[0][:2], num_steps=events[0][2])
    assert acc.epsilon(1e-6) == pytest.approx(google_pld_epsilon(events, 1e-6), rel=0.05)


def test_stepping_n_times_equals_num_steps_n():
    one_by_one, at_once = make_accountant("rdp"), make_accountant("rdp")
    for _ in range(37):
        one_by_one.step(1.2, 0.05)
    at_once.step(1.2, 0.05, num_steps=37)
    assert one_by_one.history == at_once.history == [(1.2, 0.05, 37)]
    assert one_by_one.epsilon(1e-5) == at_once.epsilon(1e-5)


@pytest.mark.parametrize("name,checkpoints", [("rdp", [1, 2, 3, 5, 8, 13, 21, 34, 55]), ("prv", [1, 5, 20, 60])])
def test_epsilon_grows_monotonically_with_steps(name, checkpoints):
    acc = make_accountant(name)
    eps, done = [], 0
    for n in checkpoints:
        acc.step(1.0, 0.05, num_steps=n - done)
        done = n
        eps.append(acc.epsilon(1e-5))
    assert all(b > a for a, b in zip(eps, eps[1:])), eps
    assert acc.steps == checkpoints[-1]


def test_two_rounds_cost_more_than_one():
    acc = make_accountant("rdp")
    assert acc.epsilon(1e-5) == 0.0
    acc.step(1.5, 0.1)
    one = acc.epsilon(1e-5)
    acc.step(1.5, 0.1)
    assert 0 < one < acc.epsilon(1e-5)


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_state_dict_round_trip_through_json_gives_identical_epsilon(name):
    acc = make_accountant(name)
    acc.step(1.3, 0.02, num_steps=40)
    acc.step(0.9, 0.05, num_steps=3)
    restored = make_accountant(name)
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.history == acc.history
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)


def test_state_of_one_accountant_cannot_load_into_another():
    rdp = make_accountant("rdp")
    rdp.step(1.0, 0.1)
    with pytest.raises(ValueError, match="rdp"):
        make_accountant("prv").load_state_dict(rdp.state_dict())


def test_step_refuses_zero_noise_and_bad_rates():
    acc = make_accountant("rdp")
    with pytest.raises(ValueError):
        acc.step(0.0, 0.1)
    with pytest.raises(ValueError):
        acc.step(1.0, 0.0)
    with pytest.raises(ValueError):
        acc.step(1.0, 1.5)


def test_opacus_optimizer_hook_records_dp_sgd_steps_in_the_shared_accountant():
    """Sample-level DP-SGD (SPEC §3.2): Opacus' PrivacyEngine steps the accountant through
    get_optimizer_hook_fn; handing it ours must record the same (z, q) events."""
    from types import SimpleNamespace

    acc = make_accountant("rdp")
    hook = acc.opacus_accountant.get_optimizer_hook_fn(sample_rate=0.01)
    for _ in range(25):
        hook(SimpleNamespace(noise_multiplier=1.1, accumulated_iterations=1))
    assert acc.history == [(1.1, 0.01, 25)]
    assert acc.epsilon(1e-5) == pytest.approx(google_rdp_epsilon([(1.1, 0.01, 25)], 1e-5), rel=0.05)
