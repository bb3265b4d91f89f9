"""``fedpeft compare`` on ``--task causal-lm`` grids: the table, CSV and plots report held-out eval
loss and perplexity (mean and 95% interval over seeds, lower is better), which the task declares
(``Task.metrics``), instead of an accuracy the task does not have."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
from rich.console import Console
from scipy import stats

from fedpeft import cli
from fedpeft.compare import load_experiment, run_experiment
from fedpeft.results import FinalRecord, ResultsWriter, RoundRecord

PNG = b"\x89PNG\r\n\x1a\n"


def _grid(tiny_lm, tmp_path, extra: str = "") -> str:
    model, data = tiny_lm
    path = tmp_path / "lm.toml"
    path.write_text(f'[base]\ntask = "causal-lm"\nmodel = "{model}"\ndataset = "{data}"\nbackend = "inprocess"\n'
                    'clients = 3\ncohort = 3\nrounds = 2\nbatch-size = 4\nmax-client-examples = 0\n'
                    f'[grid]\nlr = [0.001, 0.02]\nseed = [0, 1]\n{extra}')
    return str(path)


def _t_interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def test_a_causal_lm_grid_compares_eval_loss_and_perplexity(tiny_lm, tmp_path, monkeypatch):
    """Two cells x two seeds of real tiny-Llama runs through ``fedpeft compare``; the expected
    numbers are recomputed here from each run's results.json."""
    out = tmp_path / "cmp"
    console = Console(record=True, width=400)
    monkeypatch.setattr(cli, "console", console)
    assert cli.main(["compare", _grid(tiny_lm, tmp_path, '[compare]\nbaseline = {lr = 0.001}\n'),
                     "--output", str(out)]) == 0
    finals = {}
    for lr in (0.001, 0.02):
        for seed in (0, 1):
            run = json.loads((out / "runs" / f"lr={lr}__seed={seed}" / "results.json").read_text())
            finals[lr, seed] = run["final"]["eval_loss"]
            assert run["final"]["accuracy"] is None
    rows = {r["setting"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    for lr in (0.001, 0.02):
        row = rows[f"lr={lr}"]
        losses = [finals[lr, 0], finals[lr, 1]]
        mean, low, high = _t_interval(losses)
        assert (float(row["eval_loss_mean"]), float(row["eval_loss_ci_low"]), float(row["eval_loss_ci_high"])) \
            == pytest.approx((mean, low, high), rel=1e-9)
        # perplexity: the mean over seeds of exp(loss), not exp of the mean loss
        ppl = [math.exp(v) for v in losses]
        assert (float(row["perplexity_mean"]), float(row["perplexity_ci_low"]), float(row["perplexity_ci_high"])) \
            == pytest.approx(_t_interval(ppl), rel=1e-6)
        assert row["accuracy_mean"] == "" and row["accuracy_std"] == ""
    # paired by seed against lr=0.001, lower eval loss is better
    diffs = [finals[0.02, s] - finals[0.001, s] for s in (0, 1)]
    mean, low, high = _t_interval(diffs)
    r = rows["lr=0.02"]
    assert float(r["eval_loss_diff_mean"]) == pytest.approx(mean, rel=1e-9)
    assert (float(r["eval_loss_diff_ci_low"]), float(r["eval_loss_diff_ci_high"])) == pytest.approx((low, high))
    expected = "no detectable difference" if low <= 0 <= high else ("better" if mean < 0 else "worse")
    assert r["eval_loss_verdict"] == expected and rows["lr=0.001"]["eval_loss_verdict"] == "baseline"

    md = (out / "comparison.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| setting"))
    assert "final eval loss, mean [95% CI]" in header and "final perplexity, mean [95% CI]" in header
    assert "Δ eval loss vs baseline [95% CI]" in header and "accuracy, mean" not in header
    assert "(lower eval loss is better)" in md
    line = next(li for li in md.splitlines() if li.startswith("| lr=0.02 |"))
    m, lo, hi = _t_interval([finals[0.02, 0], finals[0.02, 1]])
    assert f"| {m:.4f} [{lo:.4f}, {hi:.4f}] |" in line
    # the terminal table shows the same columns (empty ones, like accuracy, are left out)
    text = console.export_text()
    assert "eval loss [95% CI]" in text and "perplexity [95% CI]" in text and "accuracy [95% CI]" not in text
    for png in ("eval_loss_vs_round.png", "eval_loss_vs_bytes.png", "perplexity_vs_round.png",
                "final_eval_loss.png", "final_eval_loss_vs_bytes.png"):
        assert (out / png).read_bytes()[:8] == PNG, png


def test_lower_eval_loss_is_better_in_the_verdict_and_the_pareto_front(tiny_lm, tmp_path):
    """No federation runs: a fake runner writes fixed losses, so the direction is checked by hand."""
    exp = load_experiment(_grid(tiny_lm, tmp_path, '[compare]\nbaseline = {lr = 0.001}\n'))
    loss = {(0.001, 0): 2.00, (0.001, 1): 2.10, (0.02, 0): 1.50, (0.02, 1): 1.61}

    def fake(cfg, run_dir):
        w = ResultsWriter(run_dir)
        w.on_start(cfg.to_dict(), {})
        value = loss[cfg.lr, cfg.seed]
        for t in (1, 2):
            w.on_round(RoundRecord(round=t, clients_sampled=3, train_loss=1.0, eval_loss=value + 0.1 * (2 - t),
                                   eval_accuracy=None, eval_perplexity=math.exp(value + 0.1 * (2 - t)),
                                   bytes_up=100, bytes_down=10, aggregation_error=0.01, epsilon=None, rank=8,
                                   wall_s=1.0))
        w.on_finish(FinalRecord(accuracy=None, eval_loss=value, perplexity=math.exp(value), epsilon=None,
                                delta=None, noise_multiplier=None, sample_rate=1.0, accountant=None, dp_level=None,
                                bytes_up_total=200, bytes_down_total=20, wall_s=2.0))

    rows = {r["setting"]: r for r in run_experiment(exp, tmp_path / "cmp", fake)}
    better = rows["lr=0.02"]
    assert better["eval_loss_diff_mean"] == pytest.approx(-0.495)   # (-0.50 - 0.49) / 2
    assert better["eval_loss_verdict"] == "better" and better["perplexity_verdict"] == "better"
    assert better["eval_loss_diff_ci_high"] < 0
    assert better["perplexity_mean"] == pytest.approx((math.exp(1.50) + math.exp(1.61)) / 2)
    # the same bytes, lower loss: the Pareto front (of -loss) keeps lr=0.02 alone
    from fedpeft.plots import pareto_front

    assert pareto_front([(200e-6, -2.05), (200e-6, -1.555)]) == [1]
