"""Accuracy vs user-level ε at N = 1000, with 95% intervals over seeds (issues 14 and 23).

    python experiments/plot_dp_utility.py   # -> experiments/results/dp_utility_topk/accuracy_vs_epsilon.png (+ .csv)

Reads the committed summaries (``comparison.csv``: mean, std and number of runs per cell) of
the head's curve (``dp_utility_head`` + ``_nodp``) and of the best encoder-changing adapter
measured (``dp_utility_topk`` + ``_nodp``; its ε = 2 point is ``dp_adapters_topk``'s lora
cell). Intervals: mean ± t(0.975, n−1)·s/√n (scipy); a point from one run has none. The
non-private LoRA on every layer (0.799, the issue's reference) is drawn as a line.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy import stats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NO_DP = math.inf
FULL_LORA_NO_DP = 0.799  # README: non-private LoRA r8 on all six layers with the defaults
MAJORITY = 0.578

#: curve label -> (grid, which of its rows, ε of a row without an ε in its setting)
CURVES = {
    "head only (d = 770), q = 1, T = 5": [("dp_utility_head", None, None), ("dp_utility_head_nodp", None, NO_DP)],
    "LoRA r4 on layer 5 (d = 6,914), q = 0.1, T = 50": [
        ("dp_utility_topk", None, None), ("dp_adapters_topk", "adapter=lora", 2.0),
        ("dp_utility_topk_nodp", None, NO_DP)],
}


def _rows(grid: str, only: str | None, eps: float | None) -> Iterator[tuple[float, float, float, int]]:
    """(ε, mean, std, runs) of a grid's committed summary."""
    path = RESULTS / grid / "comparison.csv"
    if not path.is_file():
        return
    with path.open() as fh:
        for row in csv.DictReader(fh):
            if only is not None and row["setting"] != only:
                continue
            m = re.search(r"epsilon=([0-9.]+)", row["setting"])
            e = float(m.group(1)) if m else eps
            if e is None:
                continue
            n = int(row["runs"])
            std = float(row.get("accuracy_std") or 0.0) if n > 1 else 0.0
            yield e, float(row["accuracy_mean"]), std, n


def half_width(std: float, n: int) -> float:
    """95% t interval half-width of a mean of n runs (0 for a single run)."""
    return float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else 0.0


def main() -> Path:
    fig, ax = plt.subplots(figsize=(6.8, 4.4), dpi=110)
    table = []
    finite_max = 8.0
    for (label, sources), marker in zip(CURVES.items(), "os"):
        pts = sorted(p for src in sources for p in _rows(*src))
        if not pts:
            continue
        xs = [finite_max * 2 if e == NO_DP else e for e, *_ in pts]
        ax.errorbar(xs, [m for _, m, _, _ in pts], yerr=[half_width(s, n) for _, _, s, n in pts],
                    marker=marker, capsize=3, label=label)
        table += [{"setting": label, "epsilon": e, "runs": n, "accuracy_mean": m, "accuracy_std": s,
                   "ci95_half_width": half_width(s, n)} for e, m, s, n in pts]
    ax.axhline(FULL_LORA_NO_DP, color="tab:green", ls="--", lw=1, label=f"LoRA r8, all layers, no DP ({FULL_LORA_NO_DP})")
    ax.axhline(MAJORITY, color="grey", ls=":", lw=1, label=f"majority class {MAJORITY}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([0.5, 1, 2, 4, 8, 16], ["0.5", "1", "2", "4", "8", "∞ (no DP)"])
    ax.set_xlabel("user-level ε (δ = 1e-5, RDP), N = 1000 clients")
    ax.set_ylabel("final test accuracy (1,281 examples)")
    ax.set_title("95% intervals over runs (a point of 1 run has none)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = RESULTS / "dp_utility_topk" / "accuracy_vs_epsilon.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    with out.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"-> {out}")
    return out


if __name__ == "__main__":
    main()
