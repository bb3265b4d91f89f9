"""``fedpeft compare`` with a ``[compare] baseline``: paired differences, verdicts, their table,
CSV and plot, and the refusal of a baseline that is not a cell of the grid.

No federation runs: each cell's results.json is written by a fake runner (as in
test_compare.py), and the expectations are computed here from the fixed accuracies with scipy's
t quantiles.
"""

from __future__ import annotations

import csv
import math
import statistics

import pytest
from rich.console import Console
from scipy import stats

from fedpeft import cli
from fedpeft.compare import cell_name, load_experiment, run_experiment
from fedpeft.errors import UsageError
from fedpeft.results import FinalRecord, ResultsWriter, RoundRecord

BASE = {0: 0.70, 1: 0.74, 2: 0.72}
NOISE = {0: 0.002, 1: -0.001, 2: 0.0}
ACC = {2: BASE, 4: dict(BASE), 8: {s: BASE[s] + 0.05 + NOISE[s] for s in BASE}}  # rank -> seed -> accuracy
GRID = '[base]\nclients = 10\ncohort = 2\nrounds = 2\n[grid]\nrank = [2, 4, 8]\nseed = [0, 1, 2]\n'


def _write(tmp_path, text):
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def _fake(accuracy):
    """A runner writing a 2-round results.json whose final accuracy is ``accuracy(cfg)``."""
    def run(cfg, run_dir):
        w = ResultsWriter(run_dir)
        w.on_start(cfg.to_dict(), {})
        for t in (1, 2):
            w.on_round(RoundRecord(round=t, clients_sampled=2, train_loss=0.5, eval_loss=0.5,
                                   eval_accuracy=accuracy(cfg) - 0.05 * (2 - t), bytes_up=100, bytes_down=10,
                                   aggregation_error=0.01, epsilon=None, rank=cfg.rank, wall_s=1.0))
        w.on_finish(FinalRecord(accuracy=accuracy(cfg), epsilon=None, delta=None, noise_multiplier=None,
                                sample_rate=0.2, accountant=None, dp_level=None, bytes_up_total=200,
                                bytes_down_total=20, wall_s=2.0))
    return run


def _rows(out):
    return {r["setting"]: r for r in csv.DictReader((out / "comparison.csv").open())}


def test_verdicts_against_the_baseline_cell(tmp_path):
    exp = load_experiment(_write(tmp_path, GRID + '[compare]\nbaseline = {rank = 2}\n'))
    out = tmp_path / "cmp"
    run_experiment(exp, out, _fake(lambda cfg: ACC[cfg.rank][cfg.seed]))
    rows = _rows(out)
    assert {r["baseline"] for r in rows.values()} == {"rank=2"}
    assert rows["rank=2"]["accuracy_verdict"] == "baseline" and rows["rank=2"]["accuracy_diff_mean"] == ""
    # same accuracies on every seed
    assert rows["rank=4"]["accuracy_verdict"] == "no detectable difference"
    assert float(rows["rank=4"]["accuracy_diff_mean"]) == 0.0
    # +0.05 on every seed, spread 0.003: paired interval by hand
    diffs = [0.052, 0.049, 0.050]
    m, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(3)
    t = stats.t.ppf(0.975, 2)
    r8 = rows["rank=8"]
    assert r8["accuracy_verdict"] == "better"
    assert int(r8["accuracy_diff_pairs"]) == 3
    assert float(r8["accuracy_diff_mean"]) == pytest.approx(m)
    assert (float(r8["accuracy_diff_ci_low"]), float(r8["accuracy_diff_ci_high"])) == pytest.approx((m - t * se, m + t * se))
    assert float(r8["accuracy_diff_ci_low"]) > 0
    assert float(r8["accuracy_diff_p"]) == pytest.approx(2 * stats.t.sf(m / se, 2))
    # the table prints what the CSV holds
    md = (out / "comparison.md").read_text()
    line = next(li for li in md.splitlines() if li.startswith("| rank=8 |"))
    assert f"| +{m:.4f} [+{m - t * se:.4f}, +{m + t * se:.4f}] | 3 | {2 * stats.t.sf(m / se, 2):.1e} | better |" in line
    assert "Baseline: rank=2." in md and "covers 0" in md
    assert (out / "final_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_partial_baseline_pairs_within_the_other_grid_keys(tmp_path):
    text = ('[base]\nclients = 10\ncohort = 2\nrounds = 2\n[grid]\nrank = [2, 4]\nlr = [0.001, 0.01]\nseed = [0, 1]\n'
            '[compare]\nbaseline = {rank = 2}\n')
    exp = load_experiment(_write(tmp_path, text))
    # rank 4 gains 0.1 at lr 0.01 only (+-0.002 between seeds), nothing at lr 0.001
    acc = {(2, 0.001): [0.70, 0.74], (4, 0.001): [0.70, 0.74], (2, 0.01): [0.60, 0.66], (4, 0.01): [0.702, 0.758]}
    out = tmp_path / "cmp"
    run_experiment(exp, out, _fake(lambda cfg: acc[(cfg.rank, cfg.lr)][cfg.seed]))
    rows = _rows(out)
    assert rows["rank=4, lr=0.01"]["baseline"] == "rank=2, lr=0.01"
    assert rows["rank=4, lr=0.001"]["baseline"] == "rank=2, lr=0.001"
    assert rows["rank=4, lr=0.01"]["accuracy_verdict"] == "better"
    assert float(rows["rank=4, lr=0.01"]["accuracy_diff_mean"]) == pytest.approx(0.1)
    assert rows["rank=4, lr=0.001"]["accuracy_verdict"] == "no detectable difference"
    assert "Baseline: rank=2 at the cell's own lr." in (out / "comparison.md").read_text()


def test_one_seed_per_cell_says_n_lt_2_instead_of_an_interval(tmp_path):
    exp = load_experiment(_write(tmp_path, '[base]\nclients = 10\ncohort = 2\nrounds = 2\n[grid]\nrank = [2, 4]\n'
                                           '[compare]\nbaseline = {rank = 2}\n'))
    out = tmp_path / "cmp"
    run_experiment(exp, out, _fake(lambda cfg: {2: 0.70, 4: 0.75}[cfg.rank]))
    r4 = _rows(out)["rank=4"]
    assert r4["accuracy_verdict"] == "n < 2, no interval"
    assert r4["accuracy_ci_low"] == r4["accuracy_diff_ci_low"] == r4["accuracy_diff_p"] == ""
    assert float(r4["accuracy_diff_mean"]) == pytest.approx(0.05) and r4["accuracy_diff_pairs"] == "1"
    md = (out / "comparison.md").read_text()
    assert "| 0.7500 (n < 2, no interval) | +0.0500 | 1 | — | n < 2, no interval |" in md


def test_without_a_baseline_the_table_has_no_paired_columns(tmp_path):
    exp = load_experiment(_write(tmp_path, GRID))
    out = tmp_path / "cmp"
    run_experiment(exp, out, _fake(lambda cfg: ACC[cfg.rank][cfg.seed]))
    md = (out / "comparison.md").read_text()
    assert "verdict" not in md and "Baseline" not in md
    assert all(r["accuracy_verdict"] == "" and r["baseline"] == "" for r in _rows(out).values())


def test_cli_prints_the_verdicts_and_the_reading_notes(tmp_path, monkeypatch):
    """The summary of finished runs (compare resumes: nothing is simulated again)."""
    config = _write(tmp_path, GRID + '[compare]\nbaseline = {rank = 2}\n')
    out = tmp_path / "cmp"
    exp = load_experiment(config)
    fake = _fake(lambda cfg: ACC[cfg.rank][cfg.seed])
    for cfg in exp.cells():
        fake(cfg, out / "runs" / cell_name(cfg, exp.row_keys))
    console = Console(record=True, width=400)
    monkeypatch.setattr(cli, "console", console)
    assert cli.main(["compare", str(config), "--output", str(out)]) == 0
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│ rank=")}
    assert "better" in rows["rank=8"] and "no detectable difference" in rows["rank=4"] and "baseline" in rows["rank=2"]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(BASE.values()) / math.sqrt(3)
    assert f"0.7200 [{0.72 - half:.4f}, {0.72 + half:.4f}]" in rows["rank=2"]
    assert "Baseline: rank=2." in text


@pytest.mark.parametrize("compare,needle", [
    ("[compare]\nbaseline = {rank = 3}\n", "baseline rank = 3 in"),
    ("[compare]\nbaseline = {rank = 3}\n", "allowed: 2, 4"),
    ("[compare]\nbaseline = {clients = 10}\n", "names 'clients'"),
    ("[compare]\nbaseline = {seed = 0}\n", "names 'seed'"),
    ("[compare]\nbaseline = {seed = 0}\n", "allowed: rank, strategy"),
    ("[compare]\nbaseline = {strategy = \"fedprox\"}\n", 'baseline strategy = "fedprox"'),
    ("[compare]\nbaseline = {strategy = \"fedprox\"}\n", 'allowed: "fedavg", "flora"'),
    ("[compare]\nbaseline = {rank = \"two\"}\n", "wrong type"),
    ("[compare]\nbaseline = \"fedavg\"\n", "e.g. baseline = {rank = 2}"),
    ("[compare]\nbaseline = {}\n", "must be a table of grid values"),
    ("[compare]\nbase-line = {rank = 2}\n", "unknown key(s) ['base-line'] in [compare]"),
    ("compare = 3\n", "must be a table"),
])
def test_a_baseline_that_is_not_a_cell_is_refused_in_one_line(tmp_path, compare, needle):
    head = compare if not compare.startswith("[") else ""
    tail = compare if compare.startswith("[") else ""
    text = head + '[base]\nclients = 10\ncohort = 2\n[grid]\nrank = [2, 4]\nstrategy = ["fedavg", "flora"]\nseed = [0, 1]\n' + tail
    with pytest.raises(UsageError) as info:
        load_experiment(_write(tmp_path, text))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_seed_only_grid_has_nothing_to_name_as_baseline(tmp_path):
    with pytest.raises(UsageError, match="varies only the seed"):
        load_experiment(_write(tmp_path, '[grid]\nseed = [0, 1]\n[compare]\nbaseline = {seed = 0}\n'))
