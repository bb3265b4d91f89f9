"""fedpeft.privacy.calibration: z from (ε, δ, q, steps), δ default, plan checks (SPEC §3.1)."""

from __future__ import annotations

import functools
import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant as GoogleRdp

from fedpeft.errors import UsageError
from fedpeft.privacy.accounting import RDP_ORDERS, make_accountant
from fedpeft.privacy.calibration import (
    check_budget,
    default_delta,
    noise_multiplier_for,
    would_exceed_budget,
)


@functools.cache
def check_value_z(accountant: str) -> float:
    """SPEC §3.1 / STACK.md check value: eps 2, delta 1e-6, q 1e-3, 1000 steps."""
    return noise_multiplier_for(2.0, 1e-6, 1e-3, 1000, accountant)


def test_spec_check_value_rdp_z_is_0_71():
    assert round(check_value_z("rdp"), 2) == 0.71   # STACK.md: 0.7092


def test_spec_check_value_prv_z_is_0_61():
    assert round(check_value_z("prv"), 2) == 0.61   # STACK.md: 0.6079


def test_calibrated_z_spends_at_most_the_target_by_an_independent_accountant():
    z = check_value_z("rdp")
    google = GoogleRdp(orders=list(RDP_ORDERS))
    google.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(1e-3, dp_accounting.GaussianDpEvent(z)), 1000))
    # Opacus' bisection stops within 0.01 below the target
    assert 2.0 - 0.011 <= google.get_epsilon(1e-6) <= 2.0


@pytest.mark.parametrize("rounds,expected_rdp", [(20, 1.48), (50, 1.89)])
def test_user_level_check_values_from_stack_md(rounds, expected_rdp):
    # 1000 clients, cohort 100 (q = 0.1), eps 2, delta 1e-5
    assert noise_multiplier_for(2.0, 1e-5, 0.1, rounds, "rdp") == pytest.approx(expected_rdp, abs=0.01)


def test_extended_orders_matter_for_small_sampling_rates_and_large_z():
    # Opacus' default orders stop at 63; here the optimal order is ~344, so the default
    # orders overstate eps about 7x. Expectation from Google's RDP on the same orders.
    from opacus.accountants import RDPAccountant

    ours = make_accountant("rdp")
    ours.step(5.0, 1e-3, num_steps=100)
    default_orders = RDPAccountant()
    default_orders.history = [(5.0, 1e-3, 100)]
    with pytest.warns(UserWarning, match="largest alpha"):
        overstated = default_orders.get_epsilon(1e-6)
    google = GoogleRdp(orders=list(RDP_ORDERS))
    google.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(1e-3, dp_accounting.GaussianDpEvent(5.0)), 100))
    assert ours.epsilon(1e-6) == pytest.approx(google.get_epsilon(1e-6), rel=0.05)
    assert ours.epsilon(1e-6) < 0.5 * overstated


def test_default_delta_is_min_of_1e_5_and_n_to_the_minus_1_1():
    assert default_delta(1000) == 1e-5                      # 1000^-1.1 = 5.0e-4 > 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e6 ** -1.1)
    assert default_delta(1_000_000) < 1e-6


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.inf, math.nan])
def test_check_budget_refuses_bad_epsilon_naming_the_value(epsilon):
    with pytest.raises(UsageError, match=r"--epsilon .* allowed: a finite number > 0"):
        check_budget(epsilon, 1e-6, 1000)


@pytest.mark.parametrize("delta", [0.0, -1e-6, 1e-3, 0.5])
def test_check_budget_refuses_delta_outside_0_and_1_over_n(delta):
    with pytest.raises(UsageError, match=r"--delta .* allowed: a number in \(0, 1/N = 0.001\)"):
        check_budget(2.0, delta, 1000)


def test_check_budget_accepts_delta_just_below_1_over_n_and_refuses_it_at_1_over_n():
    assert check_budget(2.0, default_delta(1000), 1000) is None
    assert check_budget(2.0, 0.999e-3, 1000) is None
    with pytest.raises(UsageError, match="--delta"):
        check_budget(2.0, 1e-3, 1000)


def test_impossible_budget_is_a_usage_error():
    with pytest.raises(UsageError, match="--epsilon"):
        noise_multiplier_for(1e-9, 1e-6, 1.0, 10_000, "rdp")


def test_would_exceed_budget_flags_exactly_the_step_past_the_target():
    z, q, steps = noise_multiplier_for(2.0, 1e-5, 0.1, 5, "rdp"), 0.1, 5
    acc = make_accountant("rdp")
    for _ in range(steps):
        assert not would_exceed_budget(acc, z, q, 2.0, 1e-5)
        acc.step(z, q)
    assert acc.epsilon(1e-5) <= 2.0
    before = acc.state_dict()
    assert would_exceed_budget(acc, z, q, 2.0, 1e-5)
    assert acc.state_dict() == before  # the check does not spend anything


def test_calibration_is_computed_once_per_machine_and_keyed_by_every_input(tmp_path, monkeypatch):
    """Opacus' bisection runs once for given (accountant, ε, δ, q, steps); the cached z is the
    one it returned, and any changed input searches again."""
    import opacus.accountants.utils as utils

    from fedpeft.privacy.calibration import noise_multiplier_for

    monkeypatch.setenv("FEDPEFT_CACHE_DIR", str(tmp_path))
    calls = []
    real = utils.get_noise_multiplier

    def counting(**kw):  # noqa: ANN003, ANN202
        calls.append(kw["steps"])
        return real(**kw)

    monkeypatch.setattr(utils, "get_noise_multiplier", counting)
    z1 = noise_multiplier_for(2.0, 1e-5, 0.01, 3)
    z2 = noise_multiplier_for(2.0, 1e-5, 0.01, 3)
    assert z1 == z2 and calls == [3]
    assert noise_multiplier_for(2.0, 1e-5, 0.01, 4) > z1 and calls == [3, 4]
    assert noise_multiplier_for(2.0, 1e-5, 0.01, 3, accountant="prv") != z1 and len(calls) == 3
    with pytest.raises(UsageError):  # a refusal is not cached as a value
        noise_multiplier_for(1e-6, 1e-5, 1.0, 10_000)


def test_epsilon_memo_follows_the_history():
    acc = make_accountant("rdp")
    acc.step(1.1, 0.01, 10)
    e10 = acc.epsilon(1e-5)
    assert acc.epsilon(1e-5) == e10
    acc.step(1.1, 0.01, 10)
    fresh = make_accountant("rdp")
    fresh._opacus.history = list(acc._opacus.history)  # noqa: SLF001 - same history, new object
    assert acc.epsilon(1e-5) > e10
    assert acc.epsilon(1e-5) == pytest.approx(
        fresh.opacus_accountant.get_epsilon(delta=1e-5, alphas=list(RDP_ORDERS)), rel=1e-12)
