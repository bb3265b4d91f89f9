"""``fedpeft compare`` orchestration: grid expansion, validation, summary and plots.

The per-cell simulation is replaced by a writer of synthetic results so the summary maths can
be checked against hand-computed values; the real end-to-end compare on Ray is a slow test
(tests/test_slow_e2e.py).
"""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import scipy.stats

from fedpeft.compare import load_experiment, run_experiment
from fedpeft.errors import UsageError
from fedpeft.results import FinalRecord, ResultsWriter, RoundRecord


def _write(tmp_path, text):
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def test_grid_expands_to_cartesian_product(tmp_path):
    exp = load_experiment(_write(tmp_path, '[base]\nclients = 10\ncohort = 2\n[grid]\nrank = [2, 4]\nseed = [0, 1, 2]\n'))
    cells = exp.cells()
    assert len(cells) == 6
    assert {(c.rank, c.seed) for c in cells} == {(r, s) for r in (2, 4) for s in (0, 1, 2)}
    assert all(c.clients == 10 for c in cells)
    assert exp.row_keys == ["rank"]


@pytest.mark.parametrize("text,needle", [
    ("[grid]\nstrategy = ['nope']\n", "--strategy 'nope'"),
    ("[grid]\nseed = 3\n", "non-empty list"),
    ("[base]\nbogus = 1\n[grid]\nseed = [0]\n", "bogus"),
    ("[base]\nclients = 1\n", "no [grid]"),
    ("[other]\nx = 1\n", "unknown table"),
    ("[grid\n", "not valid TOML"),
])
def test_bad_experiment_files(tmp_path, text, needle):
    with pytest.raises(UsageError, match=None) as info:
        load_experiment(_write(tmp_path, text))
    assert needle in str(info.value)


def test_summary_statistics_and_outputs(tmp_path):
    exp = load_experiment(_write(tmp_path, '[base]\nclients = 10\ncohort = 2\nrounds = 2\n[grid]\nrank = [2, 4]\nseed = [0, 1]\n'))
    acc = {(2, 0): 0.70, (2, 1): 0.74, (4, 0): 0.80, (4, 1): 0.80}

    def fake_run(cfg, run_dir):
        w = ResultsWriter(run_dir)
        w.on_start(cfg.to_dict(), {})
        for t in (1, 2):
            w.on_round(RoundRecord(round=t, clients_sampled=2, train_loss=0.5, eval_loss=0.5,
                                   eval_accuracy=acc[(cfg.rank, cfg.seed)] - 0.1 * (2 - t), bytes_up=100 * cfg.rank,
                                   bytes_down=10, aggregation_error=0.01 * t, epsilon=None, rank=cfg.rank, wall_s=1.0,
                                   personalized_accuracy=0.8 + 0.05 * cfg.seed if (cfg.rank == 4 and t == 1) else None,
                                   personalized_majority=0.7 if (cfg.rank == 4 and t == 1) else None))
        w.on_finish(FinalRecord(accuracy=acc[(cfg.rank, cfg.seed)], epsilon=None, delta=None, noise_multiplier=None,
                                sample_rate=0.2, accountant=None, dp_level=None, bytes_up_total=200 * cfg.rank,
                                bytes_down_total=20, wall_s=2.0))

    rows = run_experiment(exp, tmp_path / "cmp", fake_run)
    by = {r["setting"]: r for r in rows}
    assert by["rank=2"]["accuracy_mean"] == pytest.approx(0.72)
    assert by["rank=2"]["accuracy_std"] == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert by["rank=4"]["accuracy_std"] == 0.0
    assert by["rank=4"]["bytes_up_total"] == 800
    assert by["rank=2"]["aggregation_error_mean"] == pytest.approx(0.015)
    # the last round that reported it (round 1 here), averaged over seeds; absent -> None
    assert by["rank=4"]["personalized_accuracy_mean"] == pytest.approx(0.825)
    assert by["rank=2"]["personalized_accuracy_mean"] is None
    assert by["rank=4"]["personalized_majority_mean"] == pytest.approx(0.7)
    out = tmp_path / "cmp"
    csv_rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["setting"] for r in csv_rows] == ["rank=2", "rank=4"]
    md = (out / "comparison.md").read_text()
    # 95% Student t interval over the 2 seeds: mean ± t_{0.975,1} s / sqrt(2), t from scipy
    half = scipy.stats.t.ppf(0.975, 1) * statistics.stdev([0.70, 0.74]) / 2 ** 0.5
    assert f"0.7200 [{0.72 - half:.4f}, {0.72 + half:.4f}]" in md
    half = scipy.stats.t.ppf(0.975, 1) * statistics.stdev([0.80, 0.85]) / 2 ** 0.5
    assert f"0.8250 [{0.825 - half:.4f}, {0.825 + half:.4f}] (maj. 0.7000)" in md
    assert float(csv_rows[0]["accuracy_ci_low"]) == pytest.approx(0.72 - scipy.stats.t.ppf(0.975, 1) * 0.02)
    for png in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "aggregation_error_vs_round.png", "final_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # re-running skips finished cells
    calls = []
    run_experiment(exp, out, lambda cfg, d: calls.append(d))
    assert calls == []
    assert json.loads((out / "runs" / "rank=2__seed=0" / "results.json").read_text())["final"]["accuracy"] == 0.70


def test_a_run_whose_number_is_not_finite_is_counted_not_hidden(tmp_path):
    """A diverged run (NaN loss, infinite perplexity: null in results.json) cannot enter a mean;
    the table says how many were left out instead of quietly averaging the others."""
    exp = load_experiment(_write(tmp_path, '[base]\nclients = 10\ncohort = 2\nrounds = 1\n[grid]\nseed = [0, 1, 2]\n'))
    acc = {0: 0.70, 1: float("nan"), 2: 0.74}

    def fake_run(cfg, run_dir):
        w = ResultsWriter(run_dir)
        w.on_start(cfg.to_dict(), {})
        w.on_round(RoundRecord(round=1, clients_sampled=2, train_loss=0.5, eval_loss=0.5,
                               eval_accuracy=acc[cfg.seed], bytes_up=100, bytes_down=10,
                               aggregation_error=None, epsilon=None, rank=None, wall_s=1.0))
        w.on_finish(FinalRecord(accuracy=acc[cfg.seed], epsilon=None, delta=None, noise_multiplier=None,
                                sample_rate=0.2, accountant=None, dp_level=None, bytes_up_total=100,
                                bytes_down_total=10, wall_s=1.0))

    (row,) = run_experiment(exp, tmp_path / "cmp", fake_run)
    assert row["runs"] == 3 and row["accuracy_not_finite"] == 1
    assert row["accuracy_mean"] == pytest.approx(0.72)  # the two finite runs
    half = scipy.stats.t.ppf(0.975, 1) * statistics.stdev([0.70, 0.74]) / 2 ** 0.5
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert f"0.7200 [{0.72 - half:.4f}, {0.72 + half:.4f}] (1 run not finite, left out)" in md


def test_average_last_pairs_the_mean_of_each_runs_last_evaluations(tmp_path):
    """``[compare] average-last = 2``: a run's accuracy is the mean of its last 2 evaluations
    (rounds 3 and 4: round 1 is not evaluated, round 2's 0.1 must not count), paired against the
    baseline's."""
    text = ('[base]\nclients = 10\ncohort = 2\nrounds = 4\n[grid]\nrank = [2, 4]\nseed = [0, 1, 2]\n'
            '[compare]\nbaseline = {rank = 2}\naverage-last = 2\n')
    exp = load_experiment(_write(tmp_path, text))
    assert exp.average_last == 2
    evals = {(2, 0): [0.60, 0.70], (2, 1): [0.62, 0.64], (2, 2): [0.50, 0.80],
             (4, 0): [0.66, 0.72], (4, 1): [0.70, 0.60], (4, 2): [0.61, 0.83]}

    def fake_run(cfg, run_dir):
        w = ResultsWriter(run_dir)
        w.on_start(cfg.to_dict(), {})
        for t, acc in ((1, None), (2, 0.1), (3, evals[(cfg.rank, cfg.seed)][0]), (4, evals[(cfg.rank, cfg.seed)][1])):
            w.on_round(RoundRecord(round=t, clients_sampled=2, train_loss=0.5, eval_loss=None if acc is None else 0.5,
                                   eval_accuracy=acc, bytes_up=1, bytes_down=1, aggregation_error=0.0, epsilon=None,
                                   rank=cfg.rank, wall_s=1.0))
        w.on_finish(FinalRecord(accuracy=evals[(cfg.rank, cfg.seed)][1], epsilon=None, delta=None,
                                noise_multiplier=None, sample_rate=0.2, accountant=None, dp_level=None,
                                bytes_up_total=3, bytes_down_total=3, wall_s=2.0))

    rows = {r["setting"]: r for r in run_experiment(exp, tmp_path / "cmp", fake_run)}
    late = {k: sum(v) / 2 for k, v in evals.items()}
    assert rows["rank=4"]["accuracy_mean"] == pytest.approx(statistics.fmean(late[(4, s)] for s in range(3)))
    expected = scipy.stats.ttest_rel([late[(4, s)] for s in range(3)], [late[(2, s)] for s in range(3)])
    assert rows["rank=4"]["accuracy_diff_p"] == pytest.approx(expected.pvalue)
    assert rows["rank=4"]["accuracy_diff_ci_low"] == pytest.approx(expected.confidence_interval().low)
    # the final value alone would give another mean: the setting changes what is compared
    assert statistics.fmean(evals[(4, s)][1] for s in range(3)) != pytest.approx(rows["rank=4"]["accuracy_mean"])
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "last-2-evaluations accuracy, mean [95% CI]" in md and "mean of its last 2 evaluations" in md


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "true", '"3"'])
def test_average_last_must_be_a_positive_integer(tmp_path, value):
    text = f'[base]\nclients = 10\n[grid]\nrank = [2]\n[compare]\naverage-last = {value}\n'
    with pytest.raises(UsageError, match=r"\[compare\] average-last = .*allowed: an integer >= 1"):
        load_experiment(_write(tmp_path, text))
