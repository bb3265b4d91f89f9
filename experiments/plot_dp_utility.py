"""Accuracy vs ε with error bars (std over seeds) for the dp_utility grids (issue 14).

    python experiments/plot_dp_utility.py   # -> experiments/results/dp_utility_head/accuracy_vs_epsilon.png

Reads the per-run results.json of ``dp_utility_head`` (+ its non-private twin, drawn at the
right edge as ε = ∞) and, when present, ``dp_utility_lora_r8`` (+ twin); writes the plot and a
CSV of the points beside it.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _points(name: str) -> dict[float, list[float]]:
    """ε (inf for runs without DP) -> final accuracies over seeds."""
    out: dict[float, list[float]] = defaultdict(list)
    for f in sorted((RESULTS / name / "runs").rglob("results.json")):
        doc = json.loads(f.read_text())
        eps = doc["config"]["epsilon"]
        out[float("inf") if eps is None else float(eps)].append(doc["final"]["accuracy"])
    return out


def main() -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    rows = []
    finite_max = 8.0
    for label, names, marker in (("head only, q = 1, T = 5 (planner)", ("dp_utility_head", "dp_utility_head_nodp"), "o"),
                                 ("LoRA r8, q = 1, T = 5", ("dp_utility_lora_r8", "dp_utility_lora_r8_nodp"), "s")):
        pts: dict[float, list[float]] = {}
        for n in names:
            if (RESULTS / n / "runs").is_dir():
                pts.update(_points(n))
        if not pts:
            continue
        xs = sorted(pts)
        plot_x = [finite_max * 2 if x == float("inf") else x for x in xs]
        means = [statistics.fmean(pts[x]) for x in xs]
        stds = [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(plot_x, means, yerr=stds, marker=marker, capsize=3, label=label)
        rows += [{"setting": label, "epsilon": x, "seeds": len(pts[x]), "accuracy_mean": m, "accuracy_std": s}
                 for x, m, s in zip(xs, means, stds)]
    ax.axhline(0.578, color="grey", ls=":", lw=1, label="majority class 0.578")
    ax.set_xscale("log", base=2)
    ticks = [0.5, 1, 2, 4, 8, 16]
    ax.set_xticks(ticks, ["0.5", "1", "2", "4", "8", "∞ (no DP)"])
    ax.set_xlabel("user-level ε (δ = 1e-5), N = 1000")
    ax.set_ylabel("final test accuracy (1,281 examples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = RESULTS / "dp_utility_head" / "accuracy_vs_epsilon.png"
    fig.savefig(out)
    with (out.with_suffix(".csv")).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["setting", "epsilon", "seeds", "accuracy_mean", "accuracy_std"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"-> {out}")
    return out


if __name__ == "__main__":
    main()
