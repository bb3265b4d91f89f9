"""``fedpeft compare``: a grid of simulations side by side.

An experiment file is TOML with a ``[base]`` table (any ``simulate`` setting) and a ``[grid]``
table of lists; the cartesian product of the grid lists is run, one simulation per cell and seed.
Grid keys are any setting (typically ``strategy``, ``adapter``, ``compression``, ``seed``,
``epsilon``). Every grid key but ``seed`` defines a cell (a row of the comparison); a cell's
seeds give its mean and 95% confidence interval (fedpeft/seed_statistics.py). A key that a
cell's components do not read (``fair-solver`` without LoRA-FAIR, ``density`` without
compression: options a strategy, codec or stage declares, fedpeft/options.py) is left out of
that cell, so the grid runs it once instead of once per value.

An optional ``[compare]`` table names a baseline, e.g. ``baseline = {strategy = "fedavg"}``:
each cell is then paired by seed with the cell that has the baseline's values for the keys it
names and the cell's own values for the other grid keys, and the table reports the paired
difference with its interval, p-value and a verdict (better / worse / no detectable difference).
It may also tune settings on the validation split, e.g. ``tune = {gamma = [0.5, 1.0, 2.0]}``
(with ``validation-fraction`` in ``[base]``): every cell runs each candidate on every seed and
reports the candidate with the best mean validation accuracy over its seeds; its test accuracy
(and paired difference) is the only one reported, the others stay in ``comparison.csv``'s
``tuning`` column as validation accuracies.

Outputs in the comparison directory: one run directory per run (``results.json`` each),
``comparison.csv`` (every number of the table, and more), ``comparison.md`` and PNG plots
(accuracy vs round and vs cumulative upload bytes with 95% intervals over seeds, aggregation
error vs round, final accuracy per cell and its difference to the baseline, final accuracy vs
total upload bytes). "Accuracy" is the metric the runs' task declares (``Task.metrics``): a
``--task causal-lm`` grid reports held-out eval loss and perplexity instead, lower is better,
and its baseline pairs the eval loss. A rerun into the same directory skips every run whose results.json is
complete and was made with the same settings, re-runs interrupted ones, and refuses (before
running anything) a complete run made with other settings.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig, normalize_keys, read_toml
from fedpeft.errors import UsageError
from fedpeft.seed_statistics import BASELINE, TOO_FEW, mean_interval, paired_difference
from fedpeft.settings import validate, with_task_defaults
from fedpeft.tasks import Metric, all_metrics, get_task


def _last(rounds: list[dict[str, Any]], key: str) -> float | None:
    """The last non-null value of a per-round key (None if the run never reported it)."""
    return next((r[key] for r in reversed(rounds) if r.get(key) is not None), None)


#: FedSA-LoRA: the sampled clients' own models on their local test sets (last round that reported it)
PERSONALIZED_ACCURACY = Metric("personalized_accuracy", "personalized accuracy", "personalized accuracy",
                               "personalized_accuracy", None, higher_is_better=True)
#: metrics that vary with the seed: the tasks' own (fedpeft/tasks: accuracy; eval loss and
#: perplexity) and the personalised accuracy. Each gets a 95% interval over seeds and, with a
#: baseline, a paired difference in its own direction (higher or lower is better). Bytes, ε and
#: aggregation error are properties of the mechanism and stay plain means.
TASK_METRICS: list[Metric] = all_metrics()
_DIFF_FIELDS = ["diff_mean", "diff_ci_low", "diff_ci_high", "diff_p", "diff_pairs", "verdict"]

SUMMARY_COLUMNS = ["setting", "runs",
                   *(f"{m.name}_{f}" for m in TASK_METRICS for f in ("mean", "std", "ci_low", "ci_high", "not_finite")),
                   "baseline", *(f"{m.name}_{f}" for m in TASK_METRICS for f in _DIFF_FIELDS),
                   "personalized_accuracy_mean", "personalized_accuracy_ci_low", "personalized_accuracy_ci_high",
                   "personalized_accuracy_not_finite", *(f"personalized_accuracy_{f}" for f in _DIFF_FIELDS),
                   "personalized_majority_mean",
                   "tuned", "tuning", "validation_accuracy_mean",
                   "bytes_up_total", "bytes_down_total", "epsilon", "aggregation_error_mean",
                   "aggregation_error_outside_span_mean", "wall_s_mean"]

#: settings that say where and how a run executes, not what it computes: a finished run made
#: with other values of these is still the same run (compare resumes it)
EXECUTION_SETTINGS = frozenset({"output", "backend", "cpus_per_client", "ray_address", "round_timeout",
                                "checkpoint_every", "diagnostics", "tensorboard"})


def inert_settings(cfg: RunConfig) -> frozenset[str]:
    """Component options (fedpeft/options.py) that none of the components ``cfg`` runs reads:
    ``gamma`` without ComPEFT, ``fair_solver`` without LoRA-FAIR, ``sample_clip`` without
    sample-level DP. Cells that differ only in these are the same run."""
    from fedpeft.compression import CODECS
    from fedpeft.pipeline import STAGES
    from fedpeft.strategy import STRATEGIES

    strategy = STRATEGIES.get(cfg.strategy)
    stages = [STAGES.get(n) for n in STAGES.names()]
    every = [*(STRATEGIES.get(n) for n in STRATEGIES.names()), *(CODECS.get(n) for n in CODECS.names()), *stages]
    used = [strategy, CODECS.get(cfg.compression), *(s for s in stages if s.active(cfg, strategy))]

    def declared(components: list[Any]) -> set[str]:
        return {o.name for c in components for o in getattr(c, "options", ())}

    return frozenset(declared(every) - declared(used))


@dataclass(frozen=True)
class Run:
    """One simulation of the grid: a cell's seed (and, when tuning, one candidate)."""

    cfg: RunConfig
    #: directory name under ``runs/``: the grid (and tuned) keys the run reads, and the seed
    name: str
    #: effective values of the row keys (None where the run's components do not read the key)
    row: tuple[Any, ...]
    #: the tuned keys' values as ``gamma=2.0`` ("" when nothing is tuned or read)
    candidate: str


@dataclass(frozen=True)
class Experiment:
    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    #: grid values the baseline cell has, for some or all of the row keys (empty: no baseline)
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: settings chosen per cell on the validation split: key -> candidate values (empty: none)
    tune: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    #: a cell's per-seed metric: the mean of each run's last this-many evaluations (1: the final one)
    average_last: int = 1

    def combos(self) -> list[dict[str, Any]]:
        """The grid's values of every cell and seed, in grid order."""
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]

    def candidates(self) -> list[dict[str, Any]]:
        """Every combination of the tuned values (``[{}]`` without tuning)."""
        keys = list(self.tune)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.tune[k] for k in keys))]

    def runs(self) -> list[Run]:
        """The distinct simulations, in grid order: a combination whose only differences from an
        earlier one are keys its components do not read is that same run."""
        runs: dict[str, Run] = {}
        for combo in self.combos():
            for candidate in self.candidates():
                cfg = validate(RunConfig(**with_task_defaults({**self.base, **combo, **candidate})))
                run = self._run(cfg)
                runs.setdefault(run.name, run)
        return list(runs.values())

    def metrics(self) -> list[Metric]:
        """The metrics of the tasks the grid runs, each once; the first is the headline (the
        one paired against the baseline and plotted per cell)."""
        seen: dict[str, Metric] = {}
        for task in dict.fromkeys(r.cfg.task for r in self.runs()):
            for metric in get_task(task).metrics:
                seen.setdefault(metric.name, metric)
        return list(seen.values())

    def cells(self) -> list[RunConfig]:
        """The settings of every distinct run (validated)."""
        return [r.cfg for r in self.runs()]

    def _run(self, cfg: RunConfig) -> Run:
        inert = inert_settings(cfg)
        read = [k for k in (*self.row_keys, *self.tune) if k not in inert]
        row = tuple(None if k in inert else getattr(cfg, k) for k in self.row_keys)
        candidate = ", ".join(f"{k}={getattr(cfg, k)}" for k in self.tune if k not in inert)
        return Run(cfg, cell_name(cfg, read), row, candidate)

    def row_of(self, combo: dict[str, Any]) -> tuple[Any, ...]:
        """The row (effective values of the row keys) a grid combination belongs to."""
        values = with_task_defaults({**self.base, **combo, **self.candidates()[0]})
        return self._run(validate(RunConfig(**values))).row

    @property
    def row_keys(self) -> list[str]:
        return [k for k in self.grid if k != "seed"]

    def baseline_combo(self, combo: dict[str, Any]) -> dict[str, Any]:
        """The grid values a cell is paired with: the baseline's values, the cell's own elsewhere."""
        return {**combo, **self.baseline}


def _dashed(key: str) -> str:
    return key.replace("_", "-")


def _load_baseline(table: dict[str, Any], grid: dict[str, list[Any]], path: str | Path) -> dict[str, Any]:
    """``[compare] baseline = {key = value, ...}``: grid values of non-seed keys, checked here."""
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


def _load_tune(table: dict[str, Any], base: dict[str, Any], grid: dict[str, list[Any]],
               path: str | Path) -> dict[str, list[Any]]:
    """``[compare] tune = {key = [candidates], ...}``: settings chosen per cell on the validation
    split, neither in [grid] nor in [base]; needs ``validation-fraction`` > 0."""
    raw = table.get("tune")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"[compare] tune in {path} must be a table of candidate lists, e.g. tune = {{gamma = [0.5, 1.0, 2.0]}}")
    tune: dict[str, list[Any]] = {}
    for key, values in raw.items():
        name = key.replace("-", "_")
        if not isinstance(values, list) or not values:
            raise UsageError(f"[compare] tune {key} = {json.dumps(values)} in {path} must be a non-empty list of "
                             f"candidates, e.g. tune = {{{key} = [0.5, 1.0, 2.0]}}")
        checked = [normalize_keys({key: v}, source=f"{path} [compare] tune")[name] for v in values]
        if name == "seed" or name in grid or name in base:
            where = "the seed" if name == "seed" else "in [grid]" if name in grid else "in [base]"
            raise UsageError(f"[compare] tune names {key!r} in {path}, which is {where}; allowed: a setting that is "
                             "neither the seed nor in [grid] or [base] (tuning chooses its value)")
        if len(set(map(json.dumps, checked))) != len(checked):
            raise UsageError(f"[compare] tune {key} = {json.dumps(values)} in {path} repeats a candidate; "
                             "allowed: distinct values")
        tune[name] = checked
    return tune


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
    table = data.get("compare", {})
    if not isinstance(table, dict):
        raise UsageError(f"compare in {path} must be a table, e.g. [compare] baseline = {{strategy = \"fedavg\"}}")
    unknown = set(table) - {"baseline", "tune", "average-last"}
    if unknown:
        raise UsageError(f"unknown key(s) {sorted(unknown)} in [compare] of {path}; allowed: baseline, tune, average-last")
    last = table.get("average-last", 1)
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise UsageError(f"[compare] average-last = {json.dumps(last)} in {path}; allowed: an integer >= 1 "
                         "(the number of last evaluations a run's metric is averaged over; 1 = the final one)")
    exp = Experiment(name=str(data.get("name", p.stem)), base=base, grid=grid,
                     baseline=_load_baseline(table, grid, path), tune=_load_tune(table, base, grid, path),
                     average_last=last)
    runs = exp.runs()  # validate every run before anything runs
    if exp.tune:
        missing = sorted({r.cfg.validation_fraction for r in runs if r.candidate and not r.cfg.validation_fraction})
        if missing:
            raise UsageError(f"[compare] tune in {path} chooses by validation accuracy, but validation-fraction is "
                             f"{missing[0]:g}; allowed: validation-fraction in (0, 0.5) in [base], e.g. 0.1")
    return exp


def cell_name(cfg: RunConfig, keys: list[str]) -> str:
    parts = [f"{k}={getattr(cfg, k)}" for k in keys] + [f"seed={cfg.seed}"]
    return "__".join(parts).replace("/", "_")


def _differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The settings (other than :data:`EXECUTION_SETTINGS`) in which a saved run's config
    differs from ``cfg``; a setting the saved config predates counts at its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    return [f"{_dashed(k)} = {json.dumps(saved.get(k, defaults[k]))} there, {json.dumps(v)} here"
            for k, v in cfg.to_dict().items()
            if k not in EXECUTION_SETTINGS and saved.get(k, defaults[k]) != v]


def finished(run_dir: Path, cfg: RunConfig) -> bool:
    """True when ``run_dir`` holds a complete run of ``cfg`` (its results.json has the final
    record); False when there is none or it was interrupted. A complete run of other settings
    is refused in one line: re-running would overwrite it, skipping would report it as ``cfg``."""
    path = run_dir / "results.json"
    try:
        saved = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return False  # cut off mid-write by a crash (results.json is replaced atomically, so rare)
    if not saved or not saved.get("final"):
        return False
    diffs = _differences(saved.get("config") or {}, cfg)
    if diffs:
        raise UsageError(f"{run_dir} holds a finished run with other settings ({'; '.join(diffs[:3])}); delete that "
                         "directory to re-run it, or compare into another --output")
    return True


def run_experiment(exp: Experiment, out_dir: Path, run_one: Callable[[RunConfig, Path], None],
                   on_skip: Callable[[Path], None] | None = None) -> list[dict[str, Any]]:
    """Run every run not finished yet (``run_one(cfg, run_dir)`` writes results.json; ``on_skip``
    hears of each finished one), then summarise. Finished runs are checked before anything runs;
    an interrupted run starts over."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = exp.runs()
    done = {r.name: finished(out_dir / "runs" / r.name, r.cfg) for r in runs}
    for run in runs:
        run_dir = out_dir / "runs" / run.name
        if done[run.name]:
            if on_skip is not None:  # finished earlier: a rerun of compare resumes the grid
                on_skip(run_dir)
            continue
        if run_dir.exists():  # interrupted: results, checkpoints and client state of a partial run
            shutil.rmtree(run_dir)
        run_one(dataclasses.replace(run.cfg, output=str(run_dir)), run_dir)
    return summarise(exp, out_dir)


@dataclass(frozen=True)
class Setting:
    """One setting of the grid's non-seed keys (a row of the comparison) and its runs by seed
    (when tuning: the chosen candidate's)."""

    label: str
    values: tuple[Any, ...]  # the row keys' effective values, in ``Experiment.row_keys`` order
    runs: dict[int, dict[str, Any]]
    #: the chosen candidate, e.g. ``gamma=2.0`` ("" without tuning)
    chosen: str = ""
    #: candidate -> mean validation accuracy over the cell's seeds (empty without tuning)
    tuning: dict[str, float | None] = dataclasses.field(default_factory=dict)


def _choose(candidates: dict[str, dict[int, dict[str, Any]]]) -> tuple[str, dict[str, float | None]]:
    """The candidate with the highest mean validation accuracy over its seeds (the first listed
    on a tie), and every candidate's mean."""
    means = {c: _mean([run["final"].get("validation_accuracy") for run in runs.values()])
             for c, runs in candidates.items()}
    scored = [c for c in candidates if means[c] is not None]
    if len(candidates) > 1 and not scored:
        raise UsageError(f"[compare] tune: no run of {', '.join(candidates)} reported a validation accuracy; "
                         "allowed: runs with validation-fraction > 0")
    chosen = max(scored, key=lambda c: means[c]) if scored else next(iter(candidates))  # max keeps the first
    return chosen, means


def _load_runs(exp: Experiment, out_dir: Path) -> tuple[list[Setting], dict[tuple[Any, ...], tuple[Any, ...]]]:
    """The rows, and for each grid combination (without seed) the row it is shown in."""
    rows: dict[tuple[Any, ...], dict[str, dict[int, dict[str, Any]]]] = {}
    labels: dict[tuple[Any, ...], str] = {}
    for run in exp.runs():
        labels.setdefault(run.row, ", ".join(f"{k}={v}" for k, v in zip(exp.row_keys, run.row) if v is not None)
                          or "base")
        per_seed = rows.setdefault(run.row, {}).setdefault(run.candidate, {})
        per_seed[run.cfg.seed] = json.loads((out_dir / "runs" / run.name / "results.json").read_text())
    settings = []
    for row, candidates in rows.items():
        chosen, tuning = _choose(candidates)
        settings.append(Setting(labels[row], row, candidates[chosen], chosen if len(candidates) > 1 or exp.tune else "",
                                tuning if exp.tune else {}))
    combos = {tuple(c[k] for k in exp.row_keys): c for c in exp.combos()}
    return settings, {values: exp.row_of(combo) for values, combo in combos.items()}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _metric_fields(metric: Metric, setting: Setting, baseline: Setting | None, last: int = 1) -> dict[str, Any]:
    """Mean and interval of a per-seed metric (the mean of each run's ``last`` evaluations);
    with a baseline, the paired difference."""
    name = metric.name
    per_seed = {seed: metric.value(run, last) for seed, run in setting.runs.items()}
    interval = mean_interval(list(per_seed.values()))
    # runs without a finite value (results.json stores a diverged loss or an infinite
    # perplexity as null) are left out of the mean and interval, and counted here so the table
    # says so instead of averaging the others quietly; a metric no run reports counts none
    finite = [v for v in per_seed.values() if v is not None and math.isfinite(v)]
    diverged = len(per_seed) - len(finite) if finite else 0
    out: dict[str, Any] = {f"{name}_mean": interval.mean, f"{name}_ci_low": interval.low,
                           f"{name}_ci_high": interval.high, f"{name}_not_finite": diverged}
    out.update({f"{name}_{f}": None for f in _DIFF_FIELDS})
    if baseline is None:
        return out
    base_seed = {seed: metric.value(run, last) for seed, run in baseline.runs.items()}
    if all(v is None for v in per_seed.values()) or all(v is None for v in base_seed.values()):
        return out  # one side never reports this metric (e.g. personalized accuracy of FedAvg)
    if baseline is setting:
        out[f"{name}_verdict"] = BASELINE
        return out
    diff = paired_difference(per_seed, base_seed, higher_is_better=metric.higher_is_better)
    out.update({f"{name}_diff_mean": diff.mean, f"{name}_diff_ci_low": diff.low, f"{name}_diff_ci_high": diff.high,
                f"{name}_diff_p": diff.p_value, f"{name}_diff_pairs": diff.pairs, f"{name}_verdict": diff.verdict})
    return out


def _std(values: list[float | None]) -> float | None:
    """Sample standard deviation over seeds (0 for one seed, None for none)."""
    vals = [v for v in values if v is not None]
    return (statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None


def _round_mean(runs: list[dict[str, Any]], key: str) -> float | None:
    """Mean over seeds of a run's mean over rounds of a per-round key."""
    return _mean([_mean([x.get(key) for x in r["rounds"]]) for r in runs])


def summarise(exp: Experiment, out_dir: Path) -> list[dict[str, Any]]:
    settings, row_of = _load_runs(exp, out_dir)
    by_values = {s.values: s for s in settings}
    # every row's grid values (the first combination shown in it), to find its baseline's row
    grid_values = {}
    for values, row in row_of.items():
        grid_values.setdefault(row, dict(zip(exp.row_keys, values)))
    rows = []
    for setting in settings:
        runs = list(setting.runs.values())
        baseline = None
        if exp.baseline:
            paired = exp.baseline_combo(grid_values[setting.values])
            baseline = by_values[row_of[tuple(paired[k] for k in exp.row_keys)]]
        rows.append({
            "setting": setting.label,
            "runs": len(runs),
            **{k: v for m in TASK_METRICS for k, v in _metric_fields(m, setting, baseline, exp.average_last).items()},
            **{f"{m.name}_std": _std([m.value(r, exp.average_last) for r in runs]) for m in TASK_METRICS},
            "baseline": baseline.label if baseline else None,
            **_metric_fields(PERSONALIZED_ACCURACY, setting, baseline),
            "personalized_majority_mean": _mean([_last(r["rounds"], "personalized_majority") for r in runs]),
            "tuned": setting.chosen or None,
            "tuning": "; ".join(f"{c}: {'—' if v is None else f'{v:.4f}'}" for c, v in setting.tuning.items()) or None,
            "validation_accuracy_mean": _mean([r["final"].get("validation_accuracy") for r in runs]),
            "bytes_up_total": _mean([r["final"]["bytes_up_total"] for r in runs]),
            "bytes_down_total": _mean([r["final"]["bytes_down_total"] for r in runs]),
            "epsilon": _mean([r["final"]["epsilon"] for r in runs]),
            "aggregation_error_mean": _round_mean(runs, "aggregation_error"),
            "aggregation_error_outside_span_mean": _round_mean(runs, "aggregation_error_outside_span"),
            "wall_s_mean": _mean([r["final"]["wall_s"] for r in runs]),
        })
    with (out_dir / "comparison.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "comparison.md").write_text(markdown_table(exp, rows))
    from fedpeft.plots import plot_comparison

    plot_comparison({s.label: list(s.runs.values()) for s in settings}, out_dir, rows, exp.metrics(), _which(exp))
    return rows


def _f(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_interval(row: dict[str, Any], metric: str, spec: str = ".4f") -> str:
    """``0.7200 [0.4659, 0.9741]``; a single value says it has no interval."""
    mean, low, high = row[f"{metric}_mean"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    diverged = row.get(f"{metric}_not_finite") or 0
    note = f" ({diverged} run{'s' * (diverged != 1)} not finite, left out)" if diverged else ""
    if mean is None:
        return "—" + note
    if low is None:
        return f"{mean:{spec}} ({TOO_FEW})" + note
    return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]" + note


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


def _reports_outside_span(exp: Experiment) -> bool:
    """Whether a run's strategy reports metrics of its aggregation (LoRA-FAIR: the share of the
    aggregation error outside Ā's row space)."""
    from fedpeft.strategy import STRATEGIES, FedPeftStrategy

    return any(STRATEGIES.get(s).aggregation_metrics is not FedPeftStrategy.aggregation_metrics
               for s in {r.cfg.strategy for r in exp.runs()})


def _which(exp: Experiment) -> str:
    return "final" if exp.average_last == 1 else f"last-{exp.average_last}-evaluations"


def table_columns(exp: Experiment, short: bool = False) -> list[str]:
    """Column titles of the comparison table (comparison.md, or ``short`` for the terminal;
    both print the same cells)."""
    metrics = exp.metrics()
    head = metrics[0]
    paired = [("Δ vs baseline [95% CI]" if short else f"Δ {head.title} vs baseline [95% CI]"), "pairs", "p", "verdict"]
    tuned = ", ".join(_dashed(k) for k in exp.tune)
    return ["setting", "runs",
            *(f"{m.title} [95% CI]" if short else f"{_which(exp)} {m.title}, mean [95% CI]" for m in metrics),
            *(paired if exp.baseline else []),
            *([f"{tuned} (val. acc.)" if short else f"chosen {tuned} (mean validation accuracy)"] if exp.tune else []),
            "personal acc. [95% CI]" if short else "personalized accuracy [95% CI] (local majority)",
            "bytes up", "bytes down", "ε", "agg. error" if short else "mean aggregation error",
            *(["outside Ā's span" if short else "share of FedAvg's error outside Ā's row space"]
              if _reports_outside_span(exp) else []),
            "wall s"]


def table_row(exp: Experiment, row: dict[str, Any]) -> list[str]:
    metrics = exp.metrics()
    head = metrics[0].name
    maj = row["personalized_majority_mean"]
    personal = format_interval(row, "personalized_accuracy") + ("" if maj is None else f" (maj. {maj:.4f})")
    paired = ([format_difference(row, head, "+" + metrics[0].spec), _f(row[f"{head}_diff_pairs"], "d"),
               format_p(row[f"{head}_diff_p"]), row[f"{head}_verdict"] or "—"] if exp.baseline else [])
    tuned = ([f"{row['tuned']} ({_f(row['validation_accuracy_mean'], '.4f')})" if row["tuned"] else "—"]
             if exp.tune else [])
    span = [_f(row["aggregation_error_outside_span_mean"], ".3f")] if _reports_outside_span(exp) else []
    return [row["setting"], str(row["runs"]), *(format_interval(row, m.name, m.spec) for m in metrics),
            *paired, *tuned, personal,
            _f(row["bytes_up_total"], ",.0f"), _f(row["bytes_down_total"], ",.0f"), _f(row["epsilon"], ".3f"),
            _f(row["aggregation_error_mean"], ".3e"), *span, _f(row["wall_s_mean"], ".1f")]


def reading_notes(exp: Experiment) -> list[str]:
    """What the interval and the verdict mean, for the lines above the table."""
    notes = ["Mean over a cell's seeds with its 95% Student t interval."]
    head = exp.metrics()[0]
    if exp.average_last > 1:
        notes.append(f"A run's {', '.join(m.title for m in exp.metrics())}: the mean of its last {exp.average_last} "
                     "evaluations ([compare] average-last), not the final one alone.")
    if exp.baseline:
        named = ", ".join(f"{k}={v}" for k, v in exp.baseline.items())
        others = [k for k in exp.row_keys if k not in exp.baseline]
        where = f" at the cell's own {', '.join(others)}" if others else ""
        notes.append(f"Baseline: {named}{where}. Δ = cell − baseline, paired by seed (same partition and "
                     "initialisation), over the seeds both ran, with its 95% interval and paired t test p; "
                     "an interval that covers 0 reads \"no detectable difference\", otherwise better or worse "
                     f"({'higher' if head.higher_is_better else 'lower'} {head.title} is better).")
    runs = exp.runs()
    if exp.tune:
        options = "; ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in exp.tune.items())
        fraction = sorted({r.cfg.validation_fraction for r in runs})[-1]
        notes.append(f"Tuned per cell: {options}. Every candidate ran on every seed; the cell reports the one with "
                     f"the highest mean validation accuracy over its seeds (validation: {fraction:g} of the training "
                     "examples, held out before partitioning, so no client holds them) and only that candidate's "
                     "test accuracy; ties go to the first listed. A cell whose components do not read a tuned "
                     "setting ran it once.")
        if any(r.cfg.dp != "none" for r in runs):
            k = len(exp.candidates())
            notes.append(f"Under DP each ε is one run's: a tuned cell trained up to {k} models on the same clients, "
                         f"so choosing among them spends up to {k}·ε (basic composition).")
    inert = sorted({k for r in runs for k in exp.row_keys if r.row[exp.row_keys.index(k)] is None})
    if inert:
        notes.append(f"A cell whose components do not read {', '.join(_dashed(k) for k in inert)} leaves it out of "
                     "its label and ran once (e.g. a compressor option without compression).")
    if _reports_outside_span(exp):
        notes.append("Outside Ā's span: per round and layer, the share of FedAvg's squared aggregation error "
                     "‖ΔW − B̄Ā‖² outside the row space of Ā, which no LoRA-FAIR correction ΔB can reach "
                     "(mean over rounds and seeds); near 1, LoRA-FAIR cannot do much better than FedAvg.")
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
