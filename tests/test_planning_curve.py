"""The planner's forecast from a measured privacy-utility curve (Candidate.curve)."""

from __future__ import annotations

import pytest

from fedpeft.planning.forecast import CANDIDATES, Candidate


def _cand(curve):
    return Candidate("x", {"adapter": "lora", "train_top_k": 1, "rank": 4}, {}, measured=(0.73, 4.0), curve=curve)


def test_forecast_interpolates_linearly_in_log_score_and_never_beyond_the_last_point():
    c = _cand(((16.0, 0.76), (4.0, 0.70)))  # unsorted on purpose
    assert c.predicted_accuracy(4.0, 2) == pytest.approx(0.70)
    assert c.predicted_accuracy(8.0, 2) == pytest.approx(0.73)  # log-midpoint of 4 and 16
    assert c.predicted_accuracy(16.0, 2) == pytest.approx(0.76)
    assert c.predicted_accuracy(1000.0, 2) == pytest.approx(0.76)
    # below the first point: its gain over chance (0.5) scaled by score / 4
    assert c.predicted_accuracy(2.0, 2) == pytest.approx(0.5 + 0.20 * 0.5)
    assert c.predicted_accuracy(0.0, 2) == pytest.approx(0.5)


def test_without_a_curve_the_single_point_rule_still_applies():
    c = Candidate("x", {"adapter": "head"}, {}, measured=(0.8, 4.0))
    assert c.predicted_accuracy(2.0, 2) == pytest.approx(0.5 + 0.3 * 0.5)
    assert c.predicted_accuracy(8.0, 2) == pytest.approx(0.8)


@pytest.mark.parametrize("name", ["head", "lora top-1 r4"])
def test_the_shipped_curves_reproduce_their_measurements(name):
    cand = next(c for c in CANDIDATES if c.name == name)
    assert len(cand.curve) == 5  # eps 0.5, 1, 2, 4, 8 (experiments/README.md, sections 6 and 8)
    for score, acc in cand.curve:
        assert cand.predicted_accuracy(score, 2) == pytest.approx(acc)
