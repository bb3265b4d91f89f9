"""Per-round comparison plots get one panel per baseline group, so a grid over datasets and α
draws each comparison apart (20 curves in one axis were unreadable)."""

from __future__ import annotations

import matplotlib.image
import pytest

from fedpeft import plots
from fedpeft.plots import _short, panels_of, plot_comparison


def test_cells_are_grouped_by_their_baseline_and_titled_by_what_they_share():
    labels = ["ds=a, alpha=0.1, strategy=fedavg", "ds=a, alpha=0.1, strategy=flora",
              "ds=b, alpha=0.1, strategy=fedavg", "ds=b, alpha=0.1, strategy=flora",
              "ds=b, alpha=0.1, strategy=lora-fair, solver=ridge"]
    baselines = [labels[0], labels[0], labels[2], labels[2], labels[2]]
    assert panels_of(labels, baselines) == [("ds=a, alpha=0.1", labels[:2]), ("ds=b, alpha=0.1", labels[2:])]
    assert _short(labels[4], "ds=b, alpha=0.1") == "strategy=lora-fair, solver=ridge"


@pytest.mark.parametrize("baselines", [[None, None], ["x=1", "x=1"]])
def test_one_baseline_or_none_is_one_untitled_panel(baselines):
    assert panels_of(["x=1", "x=2"], baselines) == [("", ["x=1", "x=2"])]


def test_the_figure_has_a_panel_per_group(tmp_path, monkeypatch):
    run = {"rounds": [{"eval_accuracy": 0.5, "bytes_up": 10, "aggregation_error": 0.1},
                      {"eval_accuracy": 0.6, "bytes_up": 10, "aggregation_error": 0.2}]}
    labels = ["d=a, s=x", "d=a, s=y", "d=b, s=x"]
    rows = [{"setting": lab, "baseline": base} for lab, base in zip(labels, [labels[0], labels[0], labels[2]])]
    one = plot_comparison({lab: [run] for lab in labels}, tmp_path)[0]
    # the per-cell plots need full summary rows; this test is about the per-round ones
    monkeypatch.setattr(plots, "plot_final_accuracy", lambda *a, **k: tmp_path / "skipped")
    monkeypatch.setattr(plots, "plot_accuracy_vs_bytes", lambda *a, **k: tmp_path / "skipped")
    (tmp_path / "panels").mkdir()
    two = plot_comparison({lab: [run] for lab in labels}, tmp_path / "panels", rows)[0]
    # two baselines: two panels side by side, twice as wide as the single-panel figure
    assert matplotlib.image.imread(two).shape[1] == 2 * matplotlib.image.imread(one).shape[1]


def test_the_pareto_plot_has_a_front_per_baseline_group(tmp_path):
    def row(label, base, acc, up):
        return {"setting": label, "baseline": base, "accuracy_mean": acc, "accuracy_ci_low": acc - 0.01,
                "accuracy_ci_high": acc + 0.01, "bytes_up_total": up}
    one = [row("c=none", "c=none", 0.8, 1e6), row("c=compeft", "c=none", 0.79, 1e4)]
    two = [row("d=a, s=x", "d=a, s=x", 0.6, 1e6), row("d=a, s=y", "d=a, s=x", 0.7, 1e6),
           row("d=b, s=x", "d=b, s=x", 0.9, 1e6), row("d=b, s=y", "d=b, s=x", 0.8, 2e6)]
    width = [matplotlib.image.imread(plots.plot_accuracy_vs_bytes(rows, tmp_path / f"{i}.png")).shape[1]
             for i, rows in enumerate((one, two))]
    assert width[1] == 2 * width[0]
