"""Intervals over seeds and paired differences (fedpeft/seed_statistics.py), checked against
the textbook formulas evaluated here with scipy's t quantiles (not against scipy's tests)."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy import stats

from fedpeft.seed_statistics import (BETTER, NO_DIFFERENCE, TOO_FEW, WORSE, mean_interval,
                                     paired_difference)


def test_t_quantile_is_the_tabulated_one():
    # t_{0.975} for 3 and 1 degrees of freedom from a printed t table
    assert stats.t.ppf(0.975, 3) == pytest.approx(3.182446, abs=1e-6)
    assert stats.t.ppf(0.975, 1) == pytest.approx(12.706205, abs=1e-6)


def test_mean_interval_is_mean_plus_minus_t_times_standard_error():
    values = [0.70, 0.74, 0.71, 0.69]
    interval = mean_interval(values)
    m = sum(values) / 4  # 0.71
    s = math.sqrt(sum((v - m) ** 2 for v in values) / 3)
    half = 3.182446 * s / math.sqrt(4)
    assert interval.n == 4
    assert interval.mean == pytest.approx(0.71)
    assert (interval.low, interval.high) == pytest.approx((m - half, m + half), abs=1e-6)
    # by hand: s = 0.021602, half-width 0.034374
    assert (interval.low, interval.high) == pytest.approx((0.675626, 0.744374), abs=1e-6)


def test_mean_interval_of_one_or_no_value_has_no_interval():
    assert mean_interval([0.7]) == mean_interval([0.7, None])
    one = mean_interval([0.7, None, float("nan")])
    assert (one.mean, one.low, one.high, one.n) == (0.7, None, None, 1)
    assert mean_interval([]).mean is None and mean_interval([None]).n == 0


def test_paired_difference_is_a_t_interval_of_the_per_seed_differences():
    cell = {0: 0.80, 1: 0.83, 2: 0.79, 3: 0.85}
    base = {0: 0.76, 1: 0.77, 2: 0.75, 3: 0.80}
    diffs = [cell[s] - base[s] for s in range(4)]  # 0.04, 0.06, 0.04, 0.05
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    se = sd / 2
    t = stats.t.ppf(0.975, 3)
    p = 2 * stats.t.sf(abs(m / se), 3)
    d = paired_difference(cell, base)
    assert d.pairs == 4
    assert d.mean == pytest.approx(0.0475)
    assert (d.low, d.high) == pytest.approx((m - t * se, m + t * se))
    assert d.p_value == pytest.approx(p)
    assert d.low > 0 and d.verdict == BETTER


def test_pairing_removes_the_seed_effect_an_unpaired_comparison_keeps():
    """Seeds differ by 0.10 between each other, the setting adds 0.01 on every seed: the paired
    interval excludes 0, the two cells' own intervals overlap."""
    base = {0: 0.60, 1: 0.70, 2: 0.80}
    cell = {0: 0.611, 1: 0.709, 2: 0.810}
    assert paired_difference(cell, base).verdict == BETTER
    assert mean_interval(list(cell.values())).low < mean_interval(list(base.values())).high


def test_identical_cells_show_no_detectable_difference():
    base = {0: 0.70, 1: 0.74, 2: 0.72}
    d = paired_difference(dict(base), base)
    assert (d.mean, d.low, d.high, d.pairs) == (0.0, 0.0, 0.0, 3)
    assert d.p_value is None  # no spread: no test statistic
    assert d.verdict == NO_DIFFERENCE


def test_float_noise_between_equal_results_is_not_a_difference():
    """Equal accuracies computed along different float paths differ in the last bit; every
    difference positive, a plain t interval would call that "better"."""
    base = {0: 0.3, 1: 0.6, 2: 0.7}
    cell = {s: math.nextafter(v, 1.0) for s, v in base.items()}  # +5.6e-17, +1.1e-16, +1.1e-16
    diffs = [cell[s] - base[s] for s in base]
    assert min(diffs) > 0 and len(set(diffs)) == 2
    d = paired_difference(cell, base)
    assert d.verdict == NO_DIFFERENCE and d.p_value is None


def test_a_clear_effect_is_better_and_its_negative_worse():
    base = {0: 0.70, 1: 0.74, 2: 0.72, 3: 0.69, 4: 0.73}
    noise = {0: 0.001, 1: -0.002, 2: 0.0015, 3: 0.0, 4: -0.001}
    up = {s: base[s] + 0.05 + noise[s] for s in base}
    better = paired_difference(up, base)
    assert better.verdict == BETTER and better.low > 0.04 and better.high < 0.06
    assert better.p_value < 1e-6
    worse = paired_difference(base, up)
    assert worse.verdict == WORSE and worse.high < -0.04
    assert (worse.low, worse.high) == pytest.approx((-better.high, -better.low))
    # lower-is-better metrics flip the words, not the numbers
    assert paired_difference(up, base, higher_is_better=False).verdict == WORSE


def test_an_effect_within_the_seed_noise_is_no_detectable_difference():
    base = {0: 0.70, 1: 0.74, 2: 0.72}
    cell = {0: 0.72, 1: 0.73, 2: 0.725}  # +0.02, -0.01, +0.005
    m, se = statistics.fmean([0.02, -0.01, 0.005]), statistics.stdev([0.02, -0.01, 0.005]) / math.sqrt(3)
    assert m - stats.t.ppf(0.975, 2) * se < 0  # the interval computed here covers 0
    d = paired_difference(cell, base)
    assert d.verdict == NO_DIFFERENCE and d.low < 0 < d.high and d.p_value > 0.05


def test_a_constant_difference_without_spread_is_a_point_interval():
    base = {0: 0.5, 1: 0.75}
    d = paired_difference({0: 0.625, 1: 0.875}, base)  # +0.125 exactly on both seeds
    assert (d.mean, d.low, d.high, d.p_value, d.verdict) == (0.125, 0.125, 0.125, None, BETTER)


def test_pairs_only_on_the_seeds_both_ran():
    cell = {0: 0.90, 1: 0.80, 2: 0.82, 3: 0.78}
    base = {1: 0.75, 2: 0.80, 3: 0.70, 5: 0.10, 0: None}
    d = paired_difference(cell, base)
    diffs = [0.05, 0.02, 0.08]  # seeds 1, 2, 3
    half = stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert d.pairs == 3
    assert d.mean == pytest.approx(0.05)
    assert (d.low, d.high) == pytest.approx((0.05 - half, 0.05 + half))


@pytest.mark.parametrize("cell,base,mean", [
    ({0: 0.8, 1: 0.9}, {1: 0.7, 2: 0.6}, 0.2),  # one common seed
    ({0: 0.8}, {0: 0.75}, 0.05),  # one seed each
    ({0: 0.8}, {1: 0.7}, None),  # nothing in common
    ({}, {}, None),
])
def test_fewer_than_two_pairs_say_so_instead_of_an_interval(cell, base, mean):
    d = paired_difference(cell, base)
    assert d.verdict == TOO_FEW == "n < 2, no interval"
    assert (d.low, d.high, d.p_value) == (None, None, None)
    assert d.mean == (None if mean is None else pytest.approx(mean))
