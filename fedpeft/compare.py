"""``fedpeft compare``: a grid of simulations side by side.

An experiment file is TOML with a ``[base]`` table (any ``simulate`` setting) and a ``[grid]``
table of lists; the cartesian product of the grid lists is run, one Ray simulation per cell.
Grid keys are any setting (typically ``strategy``, ``adapter``, ``compression``, ``seed``,
``epsilon``). Seeds are averaged; every other grid key defines a row of the comparison.

Outputs in the comparison directory: one run directory per cell (``results.json`` each),
``comparison.csv``, ``comparison.md`` and PNG plots (accuracy vs round, accuracy vs cumulative
upload bytes, aggregation error vs round).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig, normalize_keys, read_toml
from fedpeft.settings import validate
from fedpeft.errors import UsageError

SUMMARY_COLUMNS = ["setting", "runs", "accuracy_mean", "accuracy_std", "personalized_accuracy_mean",
                   "personalized_majority_mean",
                   "bytes_up_total", "bytes_down_total", "epsilon", "aggregation_error_mean", "wall_s_mean"]


@dataclass(frozen=True)
class Experiment:
    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]

    def cells(self) -> list[RunConfig]:
        keys = list(self.grid)
        cells = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            values = {**self.base, **dict(zip(keys, combo))}
            cells.append(validate(RunConfig(**values)))
        return cells

    @property
    def row_keys(self) -> list[str]:
        return [k for k in self.grid if k != "seed"]


def load_experiment(path: str | Path) -> Experiment:
    p = Path(path)
    data = read_toml(p, "experiment config")
    unknown = set(data) - {"base", "grid", "name", "description"}
    if unknown:
        raise UsageError(f"unknown table(s) {sorted(unknown)} in {path}; allowed: name, description, base, grid")
    base = normalize_keys(data.get("base", {}), source=f"{path} [base]")
    raw_grid = data.get("grid", {})
    grid: dict[str, list[Any]] = {}
    for key, values in raw_grid.items():
        if not isinstance(values, list) or not values:
            raise UsageError(f"[grid] {key} in {path} must be a non-empty list")
        checked = [normalize_keys({key: v}, source=f"{path} [grid]") for v in values]
        name = next(iter(checked[0]))
        grid[name] = [c[name] for c in checked]
    if not grid:
        raise UsageError(f"{path} has no [grid] table; add e.g. strategy = [\"fedavg\"]")
    exp = Experiment(name=str(data.get("name", p.stem)), base=base, grid=grid)
    exp.cells()  # validate every cell before anything runs
    return exp


def cell_name(cfg: RunConfig, keys: list[str]) -> str:
    parts = [f"{k}={getattr(cfg, k)}" for k in keys] + [f"seed={cfg.seed}"]
    return "__".join(parts).replace("/", "_")


def run_experiment(exp: Experiment, out_dir: Path,
                   run_one: Callable[[RunConfig, Path], None]) -> list[dict[str, Any]]:
    """Run every cell (``run_one(cfg, run_dir)`` writes results.json), then summarise."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for cfg in exp.cells():
        run_dir = out_dir / "runs" / cell_name(cfg, exp.row_keys)
        if (run_dir / "results.json").is_file() and json.loads((run_dir / "results.json").read_text()).get("final"):
            continue  # finished earlier: a rerun of compare resumes the grid
        run_one(dataclasses.replace(cfg, output=str(run_dir)), run_dir)
    return summarise(exp, out_dir)


def _load_runs(exp: Experiment, out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for cfg in exp.cells():
        run_dir = out_dir / "runs" / cell_name(cfg, exp.row_keys)
        res = json.loads((run_dir / "results.json").read_text())
        label = ", ".join(f"{k}={getattr(cfg, k)}" for k in exp.row_keys) or "base"
        groups.setdefault(label, []).append(res)
    return groups


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _last(rounds: list[dict[str, Any]], key: str) -> float | None:
    """The last non-null value of a per-round key (None if the run never reported it)."""
    return next((r[key] for r in reversed(rounds) if r.get(key) is not None), None)


def summarise(exp: Experiment, out_dir: Path) -> list[dict[str, Any]]:
    groups = _load_runs(exp, out_dir)
    rows = []
    for label, runs in groups.items():
        accs = [r["final"]["accuracy"] for r in runs]
        rows.append({
            "setting": label,
            "runs": len(runs),
            "accuracy_mean": _mean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            # FedSA-LoRA: the sampled clients' own models on their local test sets (last round)
            "personalized_accuracy_mean": _mean([_last(r["rounds"], "personalized_accuracy") for r in runs]),
            "personalized_majority_mean": _mean([_last(r["rounds"], "personalized_majority") for r in runs]),
            "bytes_up_total": _mean([r["final"]["bytes_up_total"] for r in runs]),
            "bytes_down_total": _mean([r["final"]["bytes_down_total"] for r in runs]),
            "epsilon": _mean([r["final"]["epsilon"] for r in runs]),
            "aggregation_error_mean": _mean([_mean([x["aggregation_error"] for x in r["rounds"]]) for r in runs]),
            "wall_s_mean": _mean([r["final"]["wall_s"] for r in runs]),
        })
    with (out_dir / "comparison.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "comparison.md").write_text(markdown_table(exp, rows))
    from fedpeft.plots import plot_comparison

    plot_comparison(groups, out_dir)
    return rows


def _f(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _personal(row: dict[str, Any]) -> str:
    """Personalized accuracy with its local-majority baseline, e.g. ``0.9375 (maj. 0.9300)``."""
    acc, maj = row["personalized_accuracy_mean"], row.get("personalized_majority_mean")
    return _f(acc, ".4f") + ("" if maj is None else f" (maj. {maj:.4f})")


def markdown_table(exp: Experiment, rows: list[dict[str, Any]]) -> str:
    lines = [f"# {exp.name}", "",
             f"Base settings: `{json.dumps(exp.base, sort_keys=True)}`; grid: `{json.dumps(exp.grid)}`.", "",
             "| setting | runs | final accuracy (mean ± std) | personalized accuracy (local majority) | bytes up | bytes down | ε | mean aggregation error | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['runs']} | {_f(r['accuracy_mean'], '.4f')} ± {_f(r['accuracy_std'], '.4f')} | "
            f"{_personal(r)} | "
            f"{_f(r['bytes_up_total'], ',.0f')} | {_f(r['bytes_down_total'], ',.0f')} | {_f(r['epsilon'], '.3f')} | "
            f"{_f(r['aggregation_error_mean'], '.3e')} | {_f(r['wall_s_mean'], '.1f')} |")
    return "\n".join(lines) + "\n"
