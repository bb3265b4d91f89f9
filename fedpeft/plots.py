"""Comparison plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    length = min(len(r["rounds"]) for r in runs)
    vals = np.array([[np.nan if x[key] is None else x[key] for x in r["rounds"][:length]] for r in runs], dtype=float)
    return np.arange(1, length + 1), np.nanmean(vals, axis=0) if np.isfinite(vals).any() else vals[0]


def plot_comparison(groups: dict[str, list[dict[str, Any]]], out_dir: Path) -> list[Path]:
    """accuracy vs round, accuracy vs cumulative upload bytes, aggregation error vs round."""
    paths = []
    specs = [("accuracy_vs_round.png", "round", "eval_accuracy", "test accuracy", False),
             ("accuracy_vs_bytes.png", "cumulative upload (MB)", "eval_accuracy", "test accuracy", False),
             ("aggregation_error_vs_round.png", "round", "aggregation_error", "aggregation error (SPEC §1.1)", True)]
    for filename, xlabel, key, ylabel, logy in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        drawn = False
        for label, runs in groups.items():
            x, y = _mean_curve(runs, key)
            if not np.isfinite(y).any():
                continue
            if "bytes" in filename:
                ups = np.array([[rr["bytes_up"] for rr in r["rounds"][: len(x)]] for r in runs], dtype=float)
                x = np.cumsum(ups.mean(axis=0)) / 1e6
            ax.plot(x, y, marker="o", ms=3, label=label)
            drawn = True
        if logy and drawn:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not applicable to these runs", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
