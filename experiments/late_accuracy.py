"""Post-hoc robustness check for a finished grid: accuracy averaged over each run's last K
evaluations instead of the last one, with the same statistics as ``fedpeft compare``
(Student t interval over seeds, paired t difference to the baseline).

Why: on label-skewed partitions with small Poisson cohorts the last evaluated model is pulled
towards the last cohort's labels, so one round's accuracy can swing by 20+ points; a mean over
the last evaluations measures the strategy rather than the last draw. This is a secondary,
post-hoc analysis: the grid's pre-set metric stays the final accuracy in comparison.md (a grid
that sets ``[compare] average-last = K`` before it runs makes this its headline instead). Beside
``fedpeft compare``'s numbers it counts the runs whose final model predicts one class.

    python experiments/late_accuracy.py experiments/results/lora_fair_powered strategy=fedavg --last 3
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from fedpeft.data.sources import load_splits
from fedpeft.seed_statistics import mean_interval, paired_difference
from fedpeft.tasks.base import ACCURACY


def _parse(name: str) -> dict[str, str]:
    """``dataset=x__strategy=y__seed=0`` -> {"dataset": "x", "strategy": "y", "seed": "0"}."""
    return dict(part.split("=", 1) for part in name.split("__"))


def late_accuracy(results: dict, last: int) -> float | None:
    """Mean test accuracy over the run's last ``last`` evaluations (None if it has none): what
    ``[compare] average-last`` tabulates."""
    return ACCURACY.value(results, last)


def class_shares(config: dict) -> tuple[list[float], int]:
    """Each class's share of the run's test split (the accuracy of a model that predicts that
    class alone), and the split's size."""
    splits = load_splits(config["dataset"], config["text_column"], config["label_column"],
                         config["test_fraction"], config["max_test_examples"])
    labels = list(splits.test[config["label_column"]])
    return [labels.count(c) / len(labels) for c in range(splits.num_labels)], len(labels)


def one_class(results: dict) -> bool:
    """The final accuracy equals one class's test share to the example: the model (almost surely)
    predicts that class alone."""
    acc = results["final"].get("accuracy")
    shares, n = class_shares(results["config"])
    return acc is not None and any(abs(acc - s) < 0.5 / n for s in shares)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid_dir", type=Path)
    ap.add_argument("baseline", help="key=value naming the baseline cells, e.g. strategy=fedavg")
    ap.add_argument("--last", type=int, default=3, help="evaluations averaged (default 3)")
    ap.add_argument("--output", type=Path, help="CSV to write (default <grid_dir>/late_accuracy.csv)")
    args = ap.parse_args()
    bkey, bval = args.baseline.split("=", 1)

    cells: dict[tuple[tuple[str, str], ...], dict[int, dict]] = {}
    for path in sorted((args.grid_dir / "runs").glob("*/results.json")):
        results = json.loads(path.read_text())
        if not results.get("final"):
            continue  # a run still going (or interrupted): compare starts it over
        keys = _parse(path.parent.name)
        seed = int(keys.pop("seed"))
        cells.setdefault(tuple(keys.items()), {})[seed] = results

    def baseline_of(cell: dict[str, str]) -> tuple[tuple[str, str], ...] | None:
        for other in cells:
            o = dict(other)
            if o.get(bkey) == bval and all(cell.get(k) == v for k, v in o.items() if k != bkey):
                return other
        return None

    rows = []
    for cell, runs in cells.items():
        late = {s: late_accuracy(r, args.last) for s, r in runs.items()}
        final = {s: r["final"].get("accuracy") for s, r in runs.items()}
        iv = mean_interval(list(late.values()))
        base = baseline_of(dict(cell))
        row = {"setting": ", ".join(f"{k}={v}" for k, v in cell), "runs": len(runs),
               f"last{args.last}_mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high,
               "final_one_class": sum(one_class(r) for r in runs.values()),
               "final_min": min(v for v in final.values() if v is not None),
               "final_max": max(v for v in final.values() if v is not None)}
        if base is not None and base != cell:
            base_late = {s: late_accuracy(r, args.last) for s, r in cells[base].items()}
            d = paired_difference(late, base_late)
            row.update(diff_mean=d.mean, diff_ci_low=d.low, diff_ci_high=d.high, p=d.p_value, verdict=d.verdict)
        rows.append(row)

    out = args.output or args.grid_dir / "late_accuracy.csv"
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        diff = ("" if "diff_mean" not in r else
                f"  Δ {r['diff_mean']:+.4f} [{r['diff_ci_low']:+.4f}, {r['diff_ci_high']:+.4f}] p {r['p']:.3f} {r['verdict']}")
        lo = "—" if r["ci_low"] is None else f"{r['ci_low']:.4f}"
        hi = "—" if r["ci_high"] is None else f"{r['ci_high']:.4f}"
        print(f"{r['setting']:<75} {r[f'last{args.last}_mean']:.4f} [{lo}, {hi}]{diff}"
              f"  (final: {r['final_one_class']}/{r['runs']} one class)")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
