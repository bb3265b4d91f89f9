"""``fedpeft compare`` resumes a grid (finished runs of the same settings are skipped,
interrupted ones re-run, finished ones of other settings refused), runs a cell once when a grid
key is an option none of its components reads, and tunes a setting on the validation split
(the candidate with the best mean validation accuracy is reported, with its test accuracy only).

No federation runs: a fake runner writes each run's results.json; expectations are computed here
by hand (and with scipy's t quantile for the paired interval).
"""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
from scipy import stats

from fedpeft.compare import load_experiment, run_experiment
from fedpeft.errors import UsageError
from fedpeft.results import FinalRecord, ResultsWriter, RoundRecord

GRID = '[base]\nclients = 10\ncohort = 2\nrounds = 2\n[grid]\nrank = [2, 4]\nseed = [0, 1]\n'


def _write(tmp_path, text, name="exp.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _fake(accuracy, validation=lambda cfg: None, calls=None):
    """A runner writing a 2-round results.json: final test accuracy ``accuracy(cfg)``, validation
    accuracy ``validation(cfg)``; appends each run's cfg to ``calls``."""
    def run(cfg, run_dir):
        if calls is not None:
            calls.append(cfg)
        w = ResultsWriter(run_dir)
        w.on_start(cfg.to_dict(), {})
        for t in (1, 2):
            w.on_round(RoundRecord(round=t, clients_sampled=2, train_loss=0.5, eval_loss=0.5,
                                   eval_accuracy=accuracy(cfg), bytes_up=100, bytes_down=10, aggregation_error=0.01,
                                   epsilon=None, rank=cfg.rank, wall_s=1.0, validation_accuracy=validation(cfg)))
        w.on_finish(FinalRecord(accuracy=accuracy(cfg), epsilon=None, delta=None, noise_multiplier=None,
                                sample_rate=0.2, accountant=None, dp_level=None, bytes_up_total=200,
                                bytes_down_total=20, wall_s=2.0, validation_accuracy=validation(cfg)))
    return run


def _rows(out):
    return {r["setting"]: r for r in csv.DictReader((out / "comparison.csv").open())}


# -- resuming ----------------------------------------------------------------------------------
def test_an_interrupted_run_starts_over_and_finished_ones_are_skipped(tmp_path):
    exp = load_experiment(_write(tmp_path, GRID))
    out = tmp_path / "cmp"
    run_experiment(exp, out, _fake(lambda cfg: 0.7))
    # rank=4, seed=1 was cut off after round 1: no final record, a stale checkpoint beside it
    cut = out / "runs" / "rank=4__seed=1"
    saved = json.loads((cut / "results.json").read_text())
    (cut / "results.json").write_text(json.dumps({**saved, "rounds": saved["rounds"][:1], "final": None}))
    (cut / "checkpoint").mkdir()
    (cut / "checkpoint" / "stale").write_text("x")
    calls, skipped = [], []
    rows = run_experiment(exp, out, _fake(lambda cfg: 0.8, calls=calls), on_skip=skipped.append)
    assert [(c.rank, c.seed) for c in calls] == [(4, 1)]
    assert [d.name for d in skipped] == ["rank=2__seed=0", "rank=2__seed=1", "rank=4__seed=0"]
    assert not (cut / "checkpoint").exists()  # started over from an empty directory
    assert json.loads((cut / "results.json").read_text())["final"]["accuracy"] == 0.8
    assert {r["setting"]: r["accuracy_mean"] for r in rows}["rank=4"] == pytest.approx(0.75)


def test_a_run_directory_without_results_is_run(tmp_path):
    exp = load_experiment(_write(tmp_path, GRID))
    out = tmp_path / "cmp"
    (out / "runs" / "rank=2__seed=0").mkdir(parents=True)  # killed before its first write
    calls = []
    run_experiment(exp, out, _fake(lambda cfg: 0.7, calls=calls))
    assert len(calls) == 4


def test_a_finished_run_of_other_settings_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "cmp"
    run_experiment(load_experiment(_write(tmp_path, GRID)), out, _fake(lambda cfg: 0.7))
    # the same grid with 3 rounds and a third seed: the old 2-round runs must not pass as 3-round ones
    changed = load_experiment(_write(tmp_path, GRID.replace("rounds = 2", "rounds = 3").replace("[0, 1]", "[0, 1, 2]")))
    calls = []
    with pytest.raises(UsageError) as info:
        run_experiment(changed, out, _fake(lambda cfg: 0.7, calls=calls))
    message = str(info.value)
    assert calls == []  # refused before the new seed ran
    assert "rank=2__seed=0 holds a finished run with other settings (rounds = 2 there, 3 here)" in message
    assert "\n" not in message


def test_settings_a_run_predates_count_at_their_default_and_execution_settings_do_not_count(tmp_path):
    exp = load_experiment(_write(tmp_path, GRID))
    out = tmp_path / "cmp"
    run_experiment(exp, out, _fake(lambda cfg: 0.7))
    for d in (out / "runs").iterdir():
        saved = json.loads((d / "results.json").read_text())
        del saved["config"]["validation_fraction"]  # written before the setting existed
        saved["config"].update(backend="ray", output="/elsewhere", round_timeout=5.0)  # ran elsewhere
        (d / "results.json").write_text(json.dumps(saved))
    calls = []
    run_experiment(exp, out, _fake(lambda cfg: 0.7, calls=calls))
    assert calls == []


# -- keys a cell's components do not read -----------------------------------------------------
def test_an_option_of_an_unused_component_does_not_multiply_runs(tmp_path):
    text = ('[base]\nclients = 10\ncohort = 2\nrounds = 2\n[grid]\nstrategy = ["fedavg", "lora-fair"]\n'
            'fair-solver = ["sgd", "ridge"]\nseed = [0, 1, 2]\n[compare]\nbaseline = {strategy = "fedavg"}\n')
    exp = load_experiment(_write(tmp_path, text))
    acc = {("fedavg", 0): 0.70, ("fedavg", 1): 0.74, ("fedavg", 2): 0.72,
           ("sgd", 0): 0.71, ("sgd", 1): 0.76, ("sgd", 2): 0.72, ("ridge", 0): 0.70, ("ridge", 1): 0.74, ("ridge", 2): 0.72}
    calls = []
    out = tmp_path / "cmp"
    run_experiment(exp, out, _fake(lambda cfg: acc[(cfg.fair_solver if cfg.strategy == "lora-fair" else "fedavg",
                                                    cfg.seed)], calls=calls))
    # fedavg reads no fair-solver: 3 seeds once, not once per solver (9 runs, not 12)
    assert len(calls) == 9
    assert sorted(d.name for d in (out / "runs").iterdir())[:3] == [f"strategy=fedavg__seed={s}" for s in range(3)]
    rows = _rows(out)
    assert list(rows) == ["strategy=fedavg", "strategy=lora-fair, fair_solver=sgd", "strategy=lora-fair, fair_solver=ridge"]
    assert rows["strategy=fedavg"]["accuracy_verdict"] == "baseline"
    # both solvers pair with the one fedavg row; differences by hand
    diffs = [0.01, 0.02, 0.0]
    m, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(3)
    sgd = rows["strategy=lora-fair, fair_solver=sgd"]
    assert sgd["baseline"] == "strategy=fedavg"
    assert (float(sgd["accuracy_diff_ci_low"]), float(sgd["accuracy_diff_ci_high"])) == pytest.approx(
        (m - stats.t.ppf(0.975, 2) * se, m + stats.t.ppf(0.975, 2) * se))
    assert rows["strategy=lora-fair, fair_solver=ridge"]["accuracy_verdict"] == "no detectable difference"
    assert "leaves it out of its label" in (out / "comparison.md").read_text()


# -- tuning on the validation split -------------------------------------------------------------
TUNED = ('[base]\nclients = 10\ncohort = 2\nrounds = 2\nvalidation-fraction = 0.1\n[grid]\n'
         'compression = ["none", "compeft"]\ndensity = [0.1, 0.2]\nseed = [0, 1, 2]\n'
         '[compare]\nbaseline = {compression = "none"}\ntune = {gamma = [0.5, 1.0, 2.0]}\n')
NOISE = {0: 0.0, 1: 0.004, 2: -0.002}
#: mean validation accuracy by (density, gamma): density 0.1 prefers gamma 2, density 0.2 gamma 0.5
VALIDATION = {(0.1, 0.5): 0.70, (0.1, 1.0): 0.72, (0.1, 2.0): 0.75, (0.2, 0.5): 0.78, (0.2, 1.0): 0.76, (0.2, 2.0): 0.71}
#: test accuracy by (density, gamma): deliberately not ordered like validation at density 0.2
TEST = {(0.1, 0.5): 0.69, (0.1, 1.0): 0.71, (0.1, 2.0): 0.74, (0.2, 0.5): 0.77, (0.2, 1.0): 0.79, (0.2, 2.0): 0.80}


def _tuned_runner(calls):
    def key(cfg):
        return cfg.density, cfg.gamma

    return _fake(lambda cfg: (0.80 if cfg.compression == "none" else TEST[key(cfg)]) + NOISE[cfg.seed],
                 lambda cfg: (0.81 if cfg.compression == "none" else VALIDATION[key(cfg)]) + NOISE[cfg.seed], calls)


def test_each_cell_reports_the_candidate_with_the_best_mean_validation_accuracy(tmp_path):
    exp = load_experiment(_write(tmp_path, TUNED))
    calls = []
    out = tmp_path / "cmp"
    run_experiment(exp, out, _tuned_runner(calls))
    # uncompressed reads neither density nor gamma: 3 runs; ComPEFT: 2 densities x 3 gammas x 3 seeds
    assert len(calls) == 3 + 18
    rows = _rows(out)
    assert list(rows) == ["compression=none", "compression=compeft, density=0.1", "compression=compeft, density=0.2"]
    assert rows["compression=none"]["tuned"] == "" and rows["compression=none"]["accuracy_verdict"] == "baseline"
    low, high = rows["compression=compeft, density=0.1"], rows["compression=compeft, density=0.2"]
    assert low["tuned"] == "gamma=2.0" and high["tuned"] == "gamma=0.5"
    # only the chosen candidate's test accuracy is reported: 0.77 at density 0.2, not the better 0.80 of gamma 2
    assert float(high["accuracy_mean"]) == pytest.approx(0.77 + statistics.fmean(NOISE.values()))
    assert float(high["validation_accuracy_mean"]) == pytest.approx(0.78 + statistics.fmean(NOISE.values()))
    assert float(high["accuracy_diff_mean"]) == pytest.approx(0.77 - 0.80)  # paired by seed: the noise cancels
    assert high["accuracy_verdict"] == "worse"
    assert float(low["accuracy_diff_mean"]) == pytest.approx(0.74 - 0.80)
    mean_noise = statistics.fmean(NOISE.values())
    assert high["tuning"] == "; ".join(f"gamma={g}: {VALIDATION[(0.2, g)] + mean_noise:.4f}" for g in (0.5, 1.0, 2.0))
    md = (out / "comparison.md").read_text()
    assert f"| gamma=0.5 ({0.78 + mean_noise:.4f}) |" in md
    assert "Tuned per cell: gamma in {0.5, 1.0, 2.0}" in md and "no client holds them" in md


def test_a_tie_goes_to_the_first_listed_candidate(tmp_path):
    exp = load_experiment(_write(tmp_path, TUNED.replace('density = [0.1, 0.2]', 'density = [0.1]')))
    out = tmp_path / "cmp"
    run_experiment(exp, out, _fake(lambda cfg: 0.7, lambda cfg: 0.75))
    assert _rows(out)["compression=compeft, density=0.1"]["tuned"] == "gamma=0.5"


@pytest.mark.parametrize("text,needle", [
    (TUNED.replace("validation-fraction = 0.1\n", ""), "chooses by validation accuracy, but validation-fraction is 0"),
    (TUNED.replace("tune = {gamma = [0.5, 1.0, 2.0]}", "tune = {density = [0.5]}"), "names 'density' in"),
    (TUNED.replace("tune = {gamma = [0.5, 1.0, 2.0]}", "tune = {seed = [0]}"), "which is the seed"),
    (TUNED.replace("tune = {gamma = [0.5, 1.0, 2.0]}", "tune = {validation-fraction = [0.2]}"), "which is in [base]"),
    (TUNED.replace("tune = {gamma = [0.5, 1.0, 2.0]}", "tune = {gamma = 2.0}"), "must be a non-empty list"),
    (TUNED.replace("tune = {gamma = [0.5, 1.0, 2.0]}", "tune = {gamma = [1.0, 1.0]}"), "repeats a candidate"),
    (TUNED.replace("tune = {gamma = [0.5, 1.0, 2.0]}", 'tune = {gamma = ["big"]}'), "wrong type"),
    (TUNED.replace("tune = {gamma = [0.5, 1.0, 2.0]}", "tune = {gamma = [-1.0]}"), "--gamma -1.0 is invalid"),
    (TUNED.replace("tune = {gamma = [0.5, 1.0, 2.0]}", "tune = [0.5]"), "must be a table of candidate lists"),
])
def test_bad_tuning_is_refused_in_one_line(tmp_path, text, needle):
    with pytest.raises(UsageError) as info:
        load_experiment(_write(tmp_path, text))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_pareto_front_keeps_the_cells_nothing_beats_on_both_bytes_and_accuracy(tmp_path):
    from fedpeft.plots import pareto_front

    # (MB, accuracy): b beats d on both; a is cheapest; c most accurate; e ties a's bytes with less accuracy
    points = [(1.0, 0.70), (2.0, 0.75), (10.0, 0.80), (3.0, 0.74), (1.0, 0.65)]
    assert pareto_front(points) == [0, 1, 2]
    exp = load_experiment(_write(tmp_path, TUNED))
    out = tmp_path / "cmp"
    run_experiment(exp, out, _tuned_runner(None))
    assert (out / "final_accuracy_vs_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
