"""Comparison plots (matplotlib, headless Agg backend), of the metrics the runs' tasks declare
(fedpeft/tasks: accuracy; eval loss and perplexity for --task causal-lm).

Error bars are 95% Student t intervals over a cell's seeds (fedpeft/seed_statistics.py); a
point from fewer than 2 seeds has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator  # noqa: E402

from fedpeft.seed_statistics import BASELINE, BETTER, NO_DIFFERENCE, WORSE, mean_interval  # noqa: E402

if TYPE_CHECKING:
    from fedpeft.tasks.base import Metric


def _curve(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, mean over seeds and the half-widths below/above it (2 x rounds, nan without one)."""
    length = min(len(r["rounds"]) for r in runs)
    columns = [[r["rounds"][t][key] for r in runs] for t in range(length)]
    intervals = [mean_interval(col) for col in columns]
    mean = np.array([np.nan if i.mean is None else i.mean for i in intervals])
    low = np.array([np.nan if i.low is None else i.low for i in intervals])
    high = np.array([np.nan if i.high is None else i.high for i in intervals])
    return np.arange(1, length + 1), mean, np.vstack([mean - low, high - mean])


def panels_of(labels: Sequence[str], baselines: Sequence[str | None]) -> list[tuple[str, list[str]]]:
    """Cells grouped by the baseline they are paired with (one panel each, titled by what its
    cells share), so a grid over datasets or α draws each comparison in its own panel instead of
    20 curves in one; without a baseline, or with one baseline, a single untitled panel."""
    order: dict[str | None, list[str]] = {}
    for label, base in zip(labels, baselines):
        order.setdefault(base, []).append(label)
    if len(order) < 2:
        return [("", list(labels))]
    out = []
    for members in order.values():
        items = [m.split(", ") for m in members]
        common = [it for it in items[0] if all(it in other for other in items[1:])] if len(items) > 1 else []
        out.append((", ".join(common), members))
    return out


def _short(label: str, title: str) -> str:
    """The label without the items the panel's title already names."""
    shared = set(title.split(", ")) if title else set()
    return ", ".join(it for it in label.split(", ") if it not in shared) or label


def _panel_grid(count: int) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels, two per row, and its visible axes in reading order."""
    cols = min(count, 2)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), dpi=110, squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def plot_comparison(groups: dict[str, list[dict[str, Any]]], out_dir: Path,
                    rows: list[dict[str, Any]] | None = None, metrics: Sequence[Metric] | None = None,
                    which: str = "final") -> list[Path]:
    """Per task metric (default: accuracy; ``<name>_vs_round.png``, ``<name>_vs_bytes.png``)
    its value vs round and vs cumulative upload bytes (both with 95% intervals over seeds),
    aggregation error vs round (means) and, given the summary ``rows``, the headline metric per
    cell with its paired difference to the baseline and against total upload bytes. With rows
    naming several baselines, the per-round plots get one panel per baseline (:func:`panels_of`)."""
    from fedpeft.tasks.base import ACCURACY

    metrics = list(metrics or [ACCURACY])
    paths = []
    specs = [spec for m in metrics for spec in (
        (f"{m.name}_vs_round.png", "round", m.round_key, f"{m.label} (95% CI over seeds)", False),
        (f"{m.name}_vs_bytes.png", "cumulative upload (MB)", m.round_key, f"{m.label} (95% CI over seeds)", False))]
    specs.append(("aggregation_error_vs_round.png", "round", "aggregation_error", "aggregation error (SPEC §1.1)", True))
    panels = (panels_of([r["setting"] for r in rows], [r.get("baseline") for r in rows])
              if rows is not None else [("", list(groups))])
    for filename, xlabel, key, ylabel, logy in specs:
        fig, axes = _panel_grid(len(panels))
        for ax, (title, members) in zip(axes, panels):
            _draw_panel(ax, {m: groups[m] for m in members if m in groups}, title, filename, xlabel, key, ylabel, logy)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    if rows is not None:
        head = metrics[0]
        paths.append(plot_final_accuracy(rows, out_dir / f"final_{head.name}.png", head, which))
        paths.append(plot_accuracy_vs_bytes(rows, out_dir / f"final_{head.name}_vs_bytes.png", head, which))
    return paths


def _draw_panel(ax: Any, groups: dict[str, list[dict[str, Any]]], title: str, filename: str,  # noqa: ANN401
                xlabel: str, key: str, ylabel: str, logy: bool) -> None:
    """One panel of a per-round plot: a curve per cell (means with 95% intervals, or means on a
    log axis for the aggregation error)."""
    drawn = False
    for i, (label, runs) in enumerate(groups.items()):
        x, y, err = _curve(runs, key)
        shown = np.isfinite(y)  # rounds without evaluation (--eval-every) are skipped, not gaps
        if not shown.any():
            continue
        if "bytes" in filename:
            ups = np.array([[rr["bytes_up"] for rr in r["rounds"][: len(x)]] for r in runs], dtype=float)
            x = np.cumsum(ups.mean(axis=0)) / 1e6
        elif not logy:  # side by side within a round, so the cells' error bars do not hide each other
            x = x + _dodge(x[shown], i, len(groups))
        name = _short(label, title)
        if logy:  # a deterministic property of the mechanism: the mean
            ax.plot(x[shown], y[shown], marker="o", ms=3, label=name)
        else:
            ax.errorbar(x[shown], y[shown], yerr=err[:, shown], marker="o", ms=3, capsize=2, elinewidth=0.8,
                        label=name)
        drawn = True
    if logy and drawn:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    if xlabel == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not applicable to these runs", ha="center", transform=ax.transAxes)


def _dodge(x: np.ndarray, index: int, count: int) -> float:
    """Offset of the index-th of count curves: spread over a third of the spacing of their points."""
    spacing = float(np.median(np.diff(x))) if len(x) > 1 else 1.0
    return (index - (count - 1) / 2) * spacing / 3 / max(count, 1)


_VERDICT_COLOURS = {BETTER: "tab:green", WORSE: "tab:red", NO_DIFFERENCE: "tab:gray", BASELINE: "black"}


def _half_widths(rows: list[dict[str, Any]], mean: str, low: str, high: str) -> np.ndarray:
    """2 x cells half-widths of the intervals (0 where a cell has none)."""
    return np.array([[0.0 if r[low] is None else r[mean] - r[low] for r in rows],
                     [0.0 if r[high] is None else r[high] - r[mean] for r in rows]])


def plot_final_accuracy(rows: list[dict[str, Any]], path: Path, metric: Metric | None = None,
                        which: str = "final") -> Path:
    """A metric's final value (default: accuracy) per cell with its 95% interval; with a
    baseline, a second panel of the paired difference (cell − baseline) with its interval
    against the line at 0."""
    from fedpeft.tasks.base import ACCURACY

    m = (metric or ACCURACY).name
    label = (metric or ACCURACY).label
    shown = [r for r in rows if r[f"{m}_mean"] is not None]
    paired = any(r[f"{m}_verdict"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(9.6 if paired else 6.4, 1.2 + 0.45 * max(len(shown), 1)),
                             dpi=110, sharey=True, squeeze=False)
    y = np.arange(len(shown))[::-1]
    ax = axes[0][0]
    ax.errorbar([r[f"{m}_mean"] for r in shown], y, xerr=_half_widths(shown, f"{m}_mean", f"{m}_ci_low",
                                                                       f"{m}_ci_high"),
                fmt="o", capsize=3, color="tab:blue")
    ax.set_yticks(y, [r["setting"] for r in shown], fontsize=7)
    ax.set_xlabel(f"{which} {label} (mean, 95% CI over seeds)")
    ax.grid(alpha=0.3, axis="x")
    if paired:
        ax = axes[0][1]
        ax.axvline(0.0, color="black", lw=0.8)
        for yi, r in zip(y, shown):
            if r[f"{m}_diff_mean"] is None:
                ax.text(0.0, yi, f" {r[f'{m}_verdict'] or '—'}", va="center", fontsize=7)
                continue
            colour = _VERDICT_COLOURS.get(r[f"{m}_verdict"], "tab:orange")  # orange: n < 2
            ax.errorbar([r[f"{m}_diff_mean"]], [yi],
                        xerr=_half_widths([r], f"{m}_diff_mean", f"{m}_diff_ci_low", f"{m}_diff_ci_high"),
                        fmt="o", capsize=3, color=colour)
            ax.annotate(r[f"{m}_verdict"], (r[f"{m}_diff_mean"], yi), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7, color=colour)
        ax.set_xlabel(f"Δ {(metric or ACCURACY).title} vs baseline (paired by seed, 95% CI)")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout(w_pad=2.0)
    fig.savefig(path)
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (fewer or equal bytes and higher or equal
    accuracy, one of them strictly), by increasing bytes."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i])


def plot_accuracy_vs_bytes(rows: list[dict[str, Any]], path: Path, metric: Metric | None = None,
                           which: str = "final") -> Path:
    """A metric's final value (default: accuracy; mean, 95% interval over seeds) against total
    upload bytes per cell, log bytes, with the Pareto front of the means (the cells no other
    cell beats on both; for a lower-is-better metric, lower counts as better). Cells paired with
    different baselines (e.g. other datasets) are not comparable: one panel and front each."""
    from fedpeft.tasks.base import ACCURACY

    metric = metric or ACCURACY
    m = metric.name
    shown = [r for r in rows if r[f"{m}_mean"] is not None and r["bytes_up_total"]]
    panels = panels_of([r["setting"] for r in shown], [r.get("baseline") for r in shown]) if shown else [("", [])]
    fig, axes = _panel_grid(len(panels))
    by_label = {r["setting"]: r for r in shown}
    for ax, (title, members) in zip(axes, panels):
        _pareto_panel(ax, [by_label[lab] for lab in members], metric, title)
        ax.set_ylabel(f"{which} {metric.label} (95% CI over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pareto_panel(ax: Any, shown: list[dict[str, Any]], metric: Metric, title: str) -> None:  # noqa: ANN401
    m = metric.name
    if shown:
        x = [float(r["bytes_up_total"]) / 1e6 for r in shown]
        y = [r[f"{m}_mean"] for r in shown]
        ax.errorbar(x, y, yerr=_half_widths(shown, f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high"),
                    fmt="o", capsize=3, color="tab:blue")
        for xi, yi, r in zip(x, y, shown):
            ax.annotate(_short(r["setting"], title), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6)
        sign = 1.0 if metric.higher_is_better else -1.0
        front = pareto_front([(xi, sign * yi) for xi, yi in zip(x, y)])
        ax.plot([x[i] for i in front], [y[i] for i in front], color="tab:orange", lw=1, label="Pareto front (means)")
        ax.set_xscale("log")
        # a byte range inside one decade has no major tick: label 2x and 5x, not every minor tick
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no finished cells", ha="center", transform=ax.transAxes)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel("total upload (MB, log scale)")
    ax.grid(alpha=0.3)
