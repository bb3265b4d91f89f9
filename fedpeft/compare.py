"""``fedpeft compare``: a grid of simulations side by side.

An experiment file is TOML with a ``[base]`` table (any ``simulate`` setting) and a ``[grid]``
table of lists; the cartesian product of the grid lists is run, one Ray simulation per cell.
Grid keys are any setting (typically ``strategy``, ``adapter``, ``compression``, ``seed``,
``epsilon``). Every grid key but ``seed`` defines a cell (a row of the comparison); a cell's
seeds give its mean and 95% confidence interval (fedpeft/seed_statistics.py).

An optional ``[compare]`` table names a baseline, e.g. ``baseline = {strategy = "fedavg"}``:
each cell is then paired by seed with the cell that has the baseline's values for the keys it
names and the cell's own values for the other grid keys, and the table reports the paired
difference with its interval, p-value and a verdict (better / worse / no detectable difference).

Outputs in the comparison directory: one run directory per cell and seed (``results.json``
each), ``comparison.csv`` (every number of the table, and more), ``comparison.md`` and PNG plots
(accuracy vs round and vs cumulative upload bytes with 95% intervals over seeds, aggregation
error vs round, final accuracy per cell and its difference to the baseline).
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
from fedpeft.errors import UsageError
from fedpeft.seed_statistics import BASELINE, TOO_FEW, mean_interval, paired_difference
from fedpeft.settings import validate


def _last(rounds: list[dict[str, Any]], key: str) -> float | None:
    """The last non-null value of a per-round key (None if the run never reported it)."""
    return next((r[key] for r in reversed(rounds) if r.get(key) is not None), None)


#: metrics that vary with the seed: each gets a 95% interval over seeds and, with a baseline,
#: a paired difference (higher is better for both). Bytes, ε and aggregation error are
#: properties of the mechanism and stay plain means.
PAIRED_METRICS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "accuracy": lambda run: run["final"]["accuracy"],
    # FedSA-LoRA: the sampled clients' own models on their local test sets (last round)
    "personalized_accuracy": lambda run: _last(run["rounds"], "personalized_accuracy"),
}
_DIFF_FIELDS = ["diff_mean", "diff_ci_low", "diff_ci_high", "diff_p", "diff_pairs", "verdict"]

SUMMARY_COLUMNS = ["setting", "runs",
                   "accuracy_mean", "accuracy_std", "accuracy_ci_low", "accuracy_ci_high",
                   "baseline", *(f"accuracy_{f}" for f in _DIFF_FIELDS),
                   "personalized_accuracy_mean", "personalized_accuracy_ci_low", "personalized_accuracy_ci_high",
                   *(f"personalized_accuracy_{f}" for f in _DIFF_FIELDS),
                   "personalized_majority_mean",
                   "bytes_up_total", "bytes_down_total", "epsilon", "aggregation_error_mean", "wall_s_mean"]


@dataclass(frozen=True)
class Experiment:
    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    #: grid values the baseline cell has, for some or all of the row keys (empty: no baseline)
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)

    def combos(self) -> list[dict[str, Any]]:
        """The grid's values of every run, in the order of ``cells``."""
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]

    def cells(self) -> list[RunConfig]:
        return [validate(RunConfig(**{**self.base, **combo})) for combo in self.combos()]

    @property
    def row_keys(self) -> list[str]:
        return [k for k in self.grid if k != "seed"]

    def baseline_of(self, setting: tuple[Any, ...]) -> tuple[Any, ...]:
        """The setting a row is paired with: the baseline's values, the row's own elsewhere."""
        return tuple(self.baseline.get(k, v) for k, v in zip(self.row_keys, setting))


def _dashed(key: str) -> str:
    return key.replace("_", "-")


def _load_baseline(data: dict[str, Any], grid: dict[str, list[Any]], path: str | Path) -> dict[str, Any]:
    """``[compare] baseline = {key = value, ...}``: grid values of non-seed keys, checked here."""
    table = data.get("compare", {})
    if not isinstance(table, dict):
        raise UsageError(f"compare in {path} must be a table, e.g. [compare] baseline = {{strategy = \"fedavg\"}}")
    unknown = set(table) - {"baseline"}
    if unknown:
        raise UsageError(f"unknown key(s) {sorted(unknown)} in [compare] of {path}; allowed: baseline")
    raw = table.get("baseline")
    if raw is None:
        return {}
    row_keys = [k for k in grid if k != "seed"]
    if not row_keys:
        raise UsageError(f"[compare] baseline in {path} needs a [grid] key besides seed to name; this grid varies only the seed")
    example = f"{_dashed(row_keys[0])} = {json.dumps(grid[row_keys[0]][0])}"
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"[compare] baseline in {path} must be a table of grid values, e.g. baseline = {{{example}}}")
    baseline: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in row_keys:
            raise UsageError(f"[compare] baseline names {key!r} in {path}, which is not a [grid] key other than seed; "
                             f"allowed: {', '.join(_dashed(k) for k in row_keys)}")
        value = normalize_keys({key: value}, source=f"{path} [compare] baseline")[name]
        if value not in grid[name]:
            raise UsageError(f"[compare] baseline {key} = {json.dumps(value)} in {path} is not in the grid; "
                             f"allowed: {', '.join(json.dumps(v) for v in grid[name])}")
        baseline[name] = grid[name][grid[name].index(value)]
    return baseline


def load_experiment(path: str | Path) -> Experiment:
    p = Path(path)
    data = read_toml(p, "experiment config")
    unknown = set(data) - {"base", "grid", "name", "description", "compare"}
    if unknown:
        raise UsageError(f"unknown table(s) {sorted(unknown)} in {path}; allowed: name, description, base, grid, compare")
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
    exp = Experiment(name=str(data.get("name", p.stem)), base=base, grid=grid,
                     baseline=_load_baseline(data, grid, path))
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


@dataclass(frozen=True)
class Setting:
    """One setting of the grid's non-seed keys (a row of the comparison) and its runs by seed."""

    label: str
    values: tuple[Any, ...]  # the row keys' grid values, in ``Experiment.row_keys`` order
    runs: dict[int, dict[str, Any]]


def _load_runs(exp: Experiment, out_dir: Path) -> list[Setting]:
    settings: dict[tuple[Any, ...], Setting] = {}
    for combo, cfg in zip(exp.combos(), exp.cells()):
        run_dir = out_dir / "runs" / cell_name(cfg, exp.row_keys)
        values = tuple(combo[k] for k in exp.row_keys)
        label = ", ".join(f"{k}={getattr(cfg, k)}" for k in exp.row_keys) or "base"
        setting = settings.setdefault(values, Setting(label, values, {}))
        setting.runs[cfg.seed] = json.loads((run_dir / "results.json").read_text())
    return list(settings.values())


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _metric_fields(name: str, setting: Setting, baseline: Setting | None) -> dict[str, Any]:
    """Mean and interval of a per-seed metric; with a baseline, the paired difference."""
    per_seed = {seed: PAIRED_METRICS[name](run) for seed, run in setting.runs.items()}
    interval = mean_interval(list(per_seed.values()))
    out: dict[str, Any] = {f"{name}_mean": interval.mean, f"{name}_ci_low": interval.low,
                           f"{name}_ci_high": interval.high}
    out.update({f"{name}_{f}": None for f in _DIFF_FIELDS})
    if baseline is None:
        return out
    base_seed = {seed: PAIRED_METRICS[name](run) for seed, run in baseline.runs.items()}
    if all(v is None for v in per_seed.values()) or all(v is None for v in base_seed.values()):
        return out  # one side never reports this metric (e.g. personalized accuracy of FedAvg)
    if baseline is setting:
        out[f"{name}_verdict"] = BASELINE
        return out
    diff = paired_difference(per_seed, base_seed)
    out.update({f"{name}_diff_mean": diff.mean, f"{name}_diff_ci_low": diff.low, f"{name}_diff_ci_high": diff.high,
                f"{name}_diff_p": diff.p_value, f"{name}_diff_pairs": diff.pairs, f"{name}_verdict": diff.verdict})
    return out


def summarise(exp: Experiment, out_dir: Path) -> list[dict[str, Any]]:
    settings = _load_runs(exp, out_dir)
    by_values = {s.values: s for s in settings}
    rows = []
    for setting in settings:
        runs = list(setting.runs.values())
        accs = [a for a in (r["final"]["accuracy"] for r in runs) if a is not None]
        baseline = by_values[exp.baseline_of(setting.values)] if exp.baseline else None
        rows.append({
            "setting": setting.label,
            "runs": len(runs),
            **_metric_fields("accuracy", setting, baseline),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "baseline": baseline.label if baseline else None,
            **_metric_fields("personalized_accuracy", setting, baseline),
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

    plot_comparison({s.label: list(s.runs.values()) for s in settings}, out_dir, rows)
    return rows


def _f(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_interval(row: dict[str, Any], metric: str, spec: str = ".4f") -> str:
    """``0.7200 [0.4659, 0.9741]``; a single value says it has no interval."""
    mean, low, high = row[f"{metric}_mean"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    if mean is None:
        return "—"
    if low is None:
        return f"{mean:{spec}} ({TOO_FEW})"
    return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


def format_difference(row: dict[str, Any], metric: str, spec: str = "+.4f") -> str:
    """``+0.0300 [+0.0100, +0.0500]`` (cell − baseline, paired by seed)."""
    mean = row[f"{metric}_diff_mean"]
    if mean is None:
        return "—"
    if row[f"{metric}_diff_ci_low"] is None:
        return f"{mean:{spec}}"
    return f"{mean:{spec}} [{row[f'{metric}_diff_ci_low']:{spec}}, {row[f'{metric}_diff_ci_high']:{spec}}]"


def format_p(p: float | None) -> str:
    return "—" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def table_columns(exp: Experiment, short: bool = False) -> list[str]:
    """Column titles of the comparison table (comparison.md, or ``short`` for the terminal;
    both print the same cells)."""
    paired = [("Δ vs baseline [95% CI]" if short else "Δ accuracy vs baseline [95% CI]"), "pairs", "p", "verdict"]
    return ["setting", "runs", "accuracy [95% CI]" if short else "final accuracy, mean [95% CI]",
            *(paired if exp.baseline else []),
            "personal acc. [95% CI]" if short else "personalized accuracy [95% CI] (local majority)",
            "bytes up", "bytes down", "ε", "agg. error" if short else "mean aggregation error", "wall s"]


def table_row(exp: Experiment, row: dict[str, Any]) -> list[str]:
    maj = row["personalized_majority_mean"]
    personal = format_interval(row, "personalized_accuracy") + ("" if maj is None else f" (maj. {maj:.4f})")
    paired = ([format_difference(row, "accuracy"), _f(row["accuracy_diff_pairs"], "d"),
               format_p(row["accuracy_diff_p"]), row["accuracy_verdict"] or "—"] if exp.baseline else [])
    return [row["setting"], str(row["runs"]), format_interval(row, "accuracy"), *paired, personal,
            _f(row["bytes_up_total"], ",.0f"), _f(row["bytes_down_total"], ",.0f"), _f(row["epsilon"], ".3f"),
            _f(row["aggregation_error_mean"], ".3e"), _f(row["wall_s_mean"], ".1f")]


def reading_notes(exp: Experiment) -> list[str]:
    """What the interval and the verdict mean, for the lines above the table."""
    notes = ["Mean over a cell's seeds with its 95% Student t interval."]
    if exp.baseline:
        named = ", ".join(f"{k}={v}" for k, v in exp.baseline.items())
        others = [k for k in exp.row_keys if k not in exp.baseline]
        where = f" at the cell's own {', '.join(others)}" if others else ""
        notes.append(f"Baseline: {named}{where}. Δ = cell − baseline, paired by seed (same partition and "
                     "initialisation), over the seeds both ran, with its 95% interval and paired t test p; "
                     "an interval that covers 0 reads \"no detectable difference\", otherwise better or worse "
                     "(higher accuracy is better).")
    return notes


def markdown_table(exp: Experiment, rows: list[dict[str, Any]]) -> str:
    columns = table_columns(exp)
    lines = [f"# {exp.name}", "",
             f"Base settings: `{json.dumps(exp.base, sort_keys=True)}`; grid: `{json.dumps(exp.grid)}`.", "",
             *reading_notes(exp), "",
             "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(table_row(exp, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
