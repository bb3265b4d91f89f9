"""The two post-hoc analyses that section 9.4 of experiments/README.md reads: late accuracy
(mean over the last K evaluations, paired against the baseline like ``fedpeft compare``) and
LoRA-FAIR's error in the first round whose inputs equal FedAvg's."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _load(name: str):  # noqa: ANN202 - a script module
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(grid: Path, name: str, rounds: list[dict], accuracy: float) -> None:
    d = grid / "runs" / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"rounds": rounds, "final": {"accuracy": accuracy},
                                                "config": {}}))


def test_late_accuracy_is_the_mean_of_the_last_evaluations_only():
    late = _load("late_accuracy")
    rounds = [{"eval_accuracy": None}, {"eval_accuracy": 0.5}, {"eval_accuracy": None},
              {"eval_accuracy": 0.6}, {"eval_accuracy": 0.7}, {"eval_accuracy": 0.9}]
    assert late.late_accuracy({"rounds": rounds}, 3) == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert late.late_accuracy({"rounds": rounds}, 10) == pytest.approx((0.5 + 0.6 + 0.7 + 0.9) / 4)
    assert late.late_accuracy({"rounds": [{"eval_accuracy": None}]}, 3) is None


def test_late_accuracy_pairs_each_cell_with_its_baseline_by_seed(tmp_path, monkeypatch, capsys):
    late = _load("late_accuracy")
    monkeypatch.setattr(late, "one_class", lambda results: False)  # needs the dataset; tested apart
    base = {0: [0.5, 0.6], 1: [0.55, 0.65], 2: [0.6, 0.62]}
    cell = {0: [0.52, 0.7], 1: [0.5, 0.69], 2: [0.7, 0.66]}
    for strategy, accs in (("fedavg", base), ("lora-fair", cell)):
        for seed, (a, b) in accs.items():
            _run(tmp_path, f"alpha=0.1__strategy={strategy}__seed={seed}",
                 [{"eval_accuracy": a}, {"eval_accuracy": None}, {"eval_accuracy": b}], b)
    monkeypatch.setattr(sys, "argv", ["late_accuracy", str(tmp_path), "strategy=fedavg", "--last", "2"])
    late.main()
    rows = {r["setting"]: r for r in __import__("csv").DictReader((tmp_path / "late_accuracy.csv").open())}
    diff = rows["alpha=0.1, strategy=lora-fair"]
    mine = [sum(cell[s]) / 2 for s in range(3)]
    theirs = [sum(base[s]) / 2 for s in range(3)]
    expected = stats.ttest_rel(mine, theirs)
    assert float(diff["diff_mean"]) == pytest.approx(sum(mine) / 3 - sum(theirs) / 3)
    assert float(diff["p"]) == pytest.approx(expected.pvalue)
    assert float(diff["diff_ci_low"]) == pytest.approx(expected.confidence_interval().low)
    assert rows["alpha=0.1, strategy=fedavg"]["diff_mean"] == ""  # the baseline is not paired with itself


def test_fair_paired_round_reads_the_first_round_with_an_error(tmp_path, monkeypatch, capsys):
    fair = _load("fair_paired_round")
    fedavg = [{"clients_sampled": 1, "aggregation_error": 0.0},
              {"clients_sampled": 3, "aggregation_error": 0.2},
              {"clients_sampled": 4, "aggregation_error": 0.5}]
    for seed, (err, share) in enumerate([(0.18, 0.64), (0.16, 0.49)]):
        _run(tmp_path, f"dataset=d__dirichlet_alpha=0.1__strategy=fedavg__seed={seed}", fedavg, 0.5)
        ours = [{"clients_sampled": 1, "aggregation_error": 0.0, "aggregation_error_outside_span": None},
                {"clients_sampled": 3, "aggregation_error": err, "aggregation_error_outside_span": share},
                {"clients_sampled": 4, "aggregation_error": 0.01, "aggregation_error_outside_span": 0.01}]
        _run(tmp_path, f"dataset=d__dirichlet_alpha=0.1__strategy=lora-fair__fair_solver=ridge__seed={seed}", ours, 0.5)
    monkeypatch.setattr(sys, "argv", ["fair_paired_round", str(tmp_path)])
    fair.main()
    line = capsys.readouterr().out.splitlines()[1]
    # ratios 0.9 and 0.8 (round 2, not round 3); floors sqrt(0.64) = 0.8 and sqrt(0.49) = 0.7
    assert "0.850 (0.800-0.900)" in line
    assert f"floor {(math.sqrt(0.64) + math.sqrt(0.49)) / 2:.3f} (0.700-0.800)" in line
    assert line.split()[:3] == ["d", "0.1", "ridge"] and line.endswith("n=2")
