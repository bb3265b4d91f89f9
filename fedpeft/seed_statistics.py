"""Statistics over seeds for ``fedpeft compare``: a mean with its confidence interval, and the
paired difference of a cell against a baseline cell.

A cell of a comparison grid runs once per seed. Two cells that ran the same seed saw the same
data partition and the same initial adapter (and, without DP, the same client sampling; DP draws
cohorts and noise from a secret key), so the difference of their results on that seed removes
the variation the seed causes; the paired Student t
interval of those differences is much narrower than the difference of two independent means
when the seed matters more than the setting (the usual case at a few seeds).

Both intervals are Student t intervals from ``scipy.stats`` (mean ± t_{0.975, n-1} · s / √n),
so they assume the per-seed values (or their differences) are roughly normal; with 2-3 seeds
they are wide, which is the honest answer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95
BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no detectable difference"
TOO_FEW = "n < 2, no interval"
#: the verdict of a cell that is its own baseline
BASELINE = "baseline"

#: spread below which per-seed values count as identical: subtracting two equal accuracies
#: computed along different float paths leaves ~1e-17, and scipy would turn that into a
#: "difference" with p ≈ 0 (and warn about precision loss)
_NO_SPREAD = 1e-12


@dataclass(frozen=True)
class Interval:
    """Mean of a metric over ``n`` seeds and its confidence interval (None when n < 2)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int


@dataclass(frozen=True)
class PairedDifference:
    """Cell − baseline, paired by seed, over the ``pairs`` seeds both sides ran.

    ``p_value`` is the two-sided paired t test of "no difference"; it is None when there are
    fewer than 2 pairs or the differences have no spread (then the interval is the point).
    """

    mean: float | None
    low: float | None
    high: float | None
    p_value: float | None
    pairs: int
    verdict: str


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _no_spread(values: Sequence[float]) -> bool:
    return max(values) - min(values) <= _NO_SPREAD


def mean_interval(values: Sequence[float | None], level: float = LEVEL) -> Interval:
    """Mean and Student t interval of the values (missing/non-finite ones dropped)."""
    vals = _finite(values)
    n = len(vals)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = statistics.fmean(vals)
    if n < 2:
        return Interval(mean, None, None, n)
    if _no_spread(vals):
        return Interval(mean, mean, mean, n)
    low, high = stats.t.interval(level, df=n - 1, loc=mean, scale=statistics.stdev(vals) / math.sqrt(n))
    return Interval(mean, float(low), float(high), n)


def verdict(low: float, high: float, mean: float, higher_is_better: bool = True) -> str:
    """"no detectable difference" when the interval covers 0 (to within float noise), else
    better/worse by its sign."""
    if low <= _NO_SPREAD and high >= -_NO_SPREAD:
        return NO_DIFFERENCE
    return BETTER if (mean > 0) == higher_is_better else WORSE


def paired_difference(cell: Mapping[int, float | None], baseline: Mapping[int, float | None],
                      level: float = LEVEL, higher_is_better: bool = True) -> PairedDifference:
    """Cell − baseline on the seeds both sides ran (``{seed: value}``; None values dropped).

    Interval and p-value are ``scipy.stats.ttest_rel``'s, i.e. the one-sample t interval and
    test of the per-seed differences.
    """
    seeds = sorted(s for s in cell.keys() & baseline.keys()
                   if _finite([cell[s]]) and _finite([baseline[s]]))
    diffs = [float(cell[s]) - float(baseline[s]) for s in seeds]  # type: ignore[arg-type]
    n = len(diffs)
    if n == 0:
        return PairedDifference(None, None, None, None, 0, TOO_FEW)
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedDifference(mean, None, None, None, n, TOO_FEW)
    if _no_spread(diffs):
        return PairedDifference(mean, mean, mean, None, n, verdict(mean, mean, mean, higher_is_better))
    test = stats.ttest_rel([cell[s] for s in seeds], [baseline[s] for s in seeds])
    ci = test.confidence_interval(confidence_level=level)
    low, high = float(ci.low), float(ci.high)
    return PairedDifference(mean, low, high, float(test.pvalue), n, verdict(low, high, mean, higher_is_better))
