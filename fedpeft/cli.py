"""``fedpeft`` command line (typer + rich).

User errors (bad flags, config files, paths) print one line and exit with code 2; nothing
is written for them. Every number shown is also in the run's ``results.json``.
"""

from __future__ import annotations

import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedpeft.cli_options import with_run_options
from fedpeft.errors import UsageError
from fedpeft.logs import install as install_logging
from fedpeft.reporting import optional_reporters
from fedpeft.results import FinalRecord, ResultsWriter, RoundRecord
from fedpeft.threads import passive_omp_wait

# before anything imports torch: libgomp reads it once, when torch loads it (fedpeft/threads.py)
passive_omp_wait()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Federated, differentially private fine-tuning of PEFT adapters.")
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


class RichReporter:
    """Progress bar per round and a final summary table."""

    def __init__(self, rounds: int) -> None:
        self.progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                 console=console, transient=False)
        self.task = self.progress.add_task("rounds", total=rounds, status="starting clients…")

    def on_start(self, config: dict[str, Any], plan: dict[str, Any]) -> None:
        train = f"{plan['train_examples']:,} train / " if "train_examples" in plan else ""
        console.print(
            f"[bold]fedpeft simulate[/]: {plan['clients']} clients, ~{plan['expected_cohort']} per round "
            f"(q={plan['sample_rate']:.4g}), {plan['rounds']} rounds, adapter {plan['adapter']}, "
            f"strategy {plan['strategy']}, {plan['trainable_parameters']:,} trainable parameters, "
            f"{train}{plan['test_examples']:,} test examples"
        )
        if plan.get("pipeline"):
            console.print(f"[bold]update pipeline[/]: {plan['pipeline']}", highlight=False)
        utility = plan.get("utility") or {}
        if utility.get("noise_to_signal") is not None or utility.get("chosen"):
            from fedpeft.planning.forecast import Plan

            for line in Plan(**utility).lines():
                (err_console if line.startswith("warning") else console).print(line, markup=False, highlight=False)
        dp = plan.get("privacy", {})
        if dp.get("dp_level"):
            console.print("[bold]privacy plan[/]: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in dp.items()
                                                              if v is not None and k != "privacy_warning"))
            console.print("under DP only what the guarantee covers is shown and saved (client-reported "
                          "statistics: --diagnostics)")
            if dp.get("privacy_warning"):
                err_console.print(f"[bold red]WARNING[/]: {dp['privacy_warning']}")
        self.progress.start()

    def on_round(self, r: RoundRecord) -> None:
        score = f"ppl {_fmt(r.eval_perplexity, '.2f')}" if r.eval_perplexity is not None else f"acc {_fmt(r.eval_accuracy)}"
        status = (f"{score}  loss {_fmt(r.eval_loss)}  clients {_fmt(r.clients_sampled, 'd')}  "
                  f"up {r.bytes_up / 1e6:.2f} MB  agg-err {_fmt(r.aggregation_error, '.2e')}  ε {_fmt(r.epsilon, '.3f')}")
        if r.personalized_accuracy is not None:
            status += f"  personal acc {_fmt(r.personalized_accuracy)}"
        self.progress.update(self.task, advance=1, status=status)

    def on_finish(self, final: FinalRecord) -> None:
        self.progress.stop()


def summary_table(writer: ResultsWriter) -> Table:
    table = Table(title="fedpeft run summary")
    personal = any(r.personalized_accuracy is not None for r in writer.rounds)  # fedsa-lora
    validation = any(r.validation_accuracy is not None for r in writer.rounds)  # --validation-fraction
    lm = any(r.eval_perplexity is not None for r in writer.rounds)  # --task causal-lm
    for col in ("round", "clients", "train loss", "eval loss", "perplexity" if lm else "accuracy",
                *(("personal acc.",) if personal else ()), *(("val. acc.",) if validation else ()), "up (bytes)",
                "down (bytes)", "agg. error", "rank", "ε", "wall s"):
        table.add_column(col, justify="right")
    for r in writer.rounds:
        table.add_row(str(r.round), _fmt(r.clients_sampled, "d"), _fmt(r.train_loss), _fmt(r.eval_loss),
                      _fmt(r.eval_perplexity, ".3f") if lm else _fmt(r.eval_accuracy),
                      *((_fmt(r.personalized_accuracy),) if personal else ()),
                      *((_fmt(r.validation_accuracy),) if validation else ()),
                      f"{r.bytes_up:,}", f"{r.bytes_down:,}",
                      _fmt(r.aggregation_error, ".2e"), _fmt(r.rank, "d"), _fmt(r.epsilon, ".3f"),
                      _fmt(r.wall_s, ".1f"))
    return table


def _prepare_output(output: str | None) -> Path:
    path = Path(output) if output else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--output {str(path)!r} already exists and is not an empty directory; "
                         "choose a new directory")
    return path


def _load_resume(resume: str, values: dict[str, Any], config: str | None):  # noqa: ANN202
    """The saved config of a run directory and its last checkpoint."""
    import json

    from fedpeft.config import RunConfig
    from fedpeft.settings import validate
    from fedpeft.engine.checkpoint import load_checkpoint

    given = [k for k, v in values.items() if v is not None]
    if given or config:
        names = ", ".join("--" + k.replace("_", "-") for k in given) or "--config"
        raise UsageError(f"--resume continues a run with its saved settings; drop {names}")
    run_dir = Path(resume)
    results = run_dir / "results.json"
    if not results.is_file():
        raise UsageError(f"--resume {resume!r} is not a fedpeft run directory (no results.json)")
    try:
        saved = json.loads(results.read_text())["config"]
        # the run directory as it is now (it may have been moved or copied since)
        cfg = validate(RunConfig(**{**saved, "output": str(run_dir)}))
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--resume {resume!r}: results.json is unreadable ({exc})") from None
    return cfg, load_checkpoint(run_dir)


@app.command()
@with_run_options
def simulate(
    config: Optional[str] = typer.Option(None, "--config", help="TOML file of settings (CLI flags override it)."),
    values: dict[str, Any] = None,  # type: ignore[assignment]  # every flag of fedpeft.cli_options.RUN_OPTIONS
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint (no other settings)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower and Ray logs."),
) -> None:
    """Simulate a federation and write results.json / rounds.csv to --output."""
    import dataclasses

    from fedpeft.settings import resolve

    checkpoint = None
    if resume is not None:
        cfg, checkpoint = _load_resume(resume, values, config)
        out = Path(resume)
    else:
        cfg = resolve(values, config)
        out = _prepare_output(cfg.output)
        cfg = dataclasses.replace(cfg, output=str(out))

    from fedpeft.engine.workspace import get_workspace
    from fedpeft.simulation import simulate as run

    with console.status("loading model and data…"):
        get_workspace(cfg)  # fail fast on model/data errors, before Ray starts or files appear
    writer = ResultsWriter(out)
    outcome = run(cfg, [writer, RichReporter(cfg.rounds), *optional_reporters(cfg)], verbose=verbose,
                  resume=checkpoint)
    console.print(summary_table(writer))
    f = outcome.final
    if f.dp_level:
        console.print(f"privacy ({f.dp_level} level): ε = {_fmt(f.epsilon, '.4f')} at δ = {f.delta:.3g}, "
                      f"z = {_fmt(f.noise_multiplier, '.4f')}, q = {f.sample_rate:.4g}, accountant {f.accountant}, "
                      f"randomness {f.randomness}")
        if f.privacy_warning:
            err_console.print(f"[bold red]WARNING[/]: {f.privacy_warning}")
    score = (f"final eval loss [bold]{_fmt(f.eval_loss)}[/], perplexity [bold]{_fmt(f.perplexity, '.3f')}[/]"
             if f.perplexity is not None else f"final accuracy [bold]{_fmt(f.accuracy)}[/]")
    if f.validation_accuracy is not None:
        score += f" (validation {_fmt(f.validation_accuracy)})"
    console.print(f"{score}, bytes up {f.bytes_up_total:,}, "
                  f"bytes down {f.bytes_down_total:,}, wall {f.wall_s:.1f} s -> {out / 'results.json'}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan(ctx: typer.Context,
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")) -> None:
    """Print the privacy-utility plan (z, q, δ, d, noise-to-signal R) of a run, without training.

    Takes every `fedpeft simulate` flag (see `fedpeft simulate --help`); given only --clients and
    --epsilon it shows the settings the planner would choose."""
    import json

    from fedpeft.settings import resolve
    from fedpeft.planning.auto import plan_for_config

    command = typer.main.get_command(app).commands["simulate"]  # type: ignore[attr-defined]
    sub = command.make_context("fedpeft plan", list(ctx.args), resilient_parsing=False)
    values = {k: v for k, v in sub.params.items() if k not in ("config", "verbose", "resume")}
    if sub.params.get("resume"):
        raise UsageError("--resume has no plan; plan the settings of a new run")
    cfg = resolve(values, sub.params.get("config"))
    report = plan_for_config(cfg)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    console.print("[bold]fedpeft plan[/]")
    for line in report.lines():
        console.print(line, markup=False, highlight=False)


@app.command()
def compare(
    config: str = typer.Argument(..., help="Experiment TOML: [base] settings and a [grid] of lists."),
    output: Optional[str] = typer.Option(None, "--output", help="Comparison directory. [default: runs/compare-<name>-<timestamp>]"),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower and Ray logs."),
) -> None:
    """Run a grid of simulations and write comparison.md/.csv and plots: per cell the mean and 95% interval over
    seeds and, with a [compare] baseline, the paired difference to it and a verdict; [compare] tune chooses
    settings per cell on the validation split. Into an existing --output, finished runs are skipped."""
    from rich.text import Text

    from fedpeft.compare import load_experiment, reading_notes, run_experiment, table_columns, table_row
    from fedpeft.tasks import get_task

    exp = load_experiment(config)
    cells = exp.cells()
    out = Path(output) if output else Path("runs") / f"compare-{exp.name}-{datetime.now():%Y%m%d-%H%M%S}"
    console.print(f"[bold]fedpeft compare[/] {exp.name}: {len(cells)} runs -> {out}")
    progress = Progress(TextColumn("[bold]runs"), MofNCompleteColumn(), BarColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    task = progress.add_task("runs", total=len(cells), status="")

    def run_one(cfg, run_dir: Path) -> None:  # noqa: ANN001
        from fedpeft.simulation import simulate as run

        progress.update(task, status=run_dir.name)
        outcome = run(cfg, [ResultsWriter(run_dir), *optional_reporters(cfg)], verbose=verbose)
        head = get_task(cfg.task).metrics[0]
        value = getattr(outcome.final, head.final_key or "", None)
        progress.update(task, advance=1, status=f"{run_dir.name}: {head.title} {_fmt(value)}")

    def skipped(run_dir: Path) -> None:
        progress.update(task, advance=1, status=f"{run_dir.name}: finished earlier")

    with progress:
        rows = run_experiment(exp, out, run_one, on_skip=skipped)
    cells = [table_row(exp, r) for r in rows]
    # a column no cell fills (personalized accuracy without FedSA-LoRA, ε without DP) is left out here only
    shown = [i for i, _ in enumerate(table_columns(exp)) if any(c[i] != "—" for c in cells) or i < 2]
    table = Table(title=f"fedpeft compare: {exp.name}")
    for i in shown:  # Text: a cell's "[low, high]" is not markup
        col = table_columns(exp, short=True)[i]
        table.add_column(Text(col), justify="left" if col in ("setting", "verdict") else "right",
                         no_wrap="[95% CI]" in col or col == "verdict")
    for c in cells:
        table.add_row(*(Text(c[i]) for i in shown))
    console.print(table)
    for note in reading_notes(exp):
        console.print(note, markup=False, highlight=False)
    console.print(f"-> {out / 'comparison.md'}, {out / 'comparison.csv'}, plots in {out}")


@app.command()
def predict(
    run: str = typer.Argument(..., help="Run directory (or its model/ directory)."),
    texts: Optional[list[str]] = typer.Argument(None, help="Texts to classify."),
    file: Optional[str] = typer.Option(None, "--file", help="Also classify a column of this csv/jsonl/json file."),
    column: Optional[str] = typer.Option(None, "--column", help="Column of --file holding the texts. [default: text]"),
    as_json: bool = typer.Option(False, "--json", help="Print the predictions as JSON."),
) -> None:
    """Classify texts with a run's exported model: label and probability per text."""
    import dataclasses
    import json

    from fedpeft.inference import predict_run

    predictions = predict_run(run, texts or [], file, column)
    if as_json:
        print(json.dumps([dataclasses.asdict(p) for p in predictions], indent=2))
        return
    for p in predictions:
        print(f"{p.label}\t{p.probability:.4f}\t{p.text}")


@app.command()
def generate(
    run: str = typer.Argument(..., help="Run directory of a --task causal-lm run (or its model/ directory)."),
    prompts: list[str] = typer.Argument(..., help="Prompts (user turns); the chat template is applied."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest completion in tokens (greedy decoding)."),
) -> None:
    """Complete prompts with a causal-LM run's exported model: one completion per prompt."""
    from fedpeft.generation import generate_run

    for text in generate_run(run, prompts, max_new_tokens):
        print(text)


@app.command("evaluate")
def evaluate_command(
    run: str = typer.Argument(..., help="Run directory."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="rotten-tomatoes, bbc-news, a local path or a hub id. [default: the run's]"),
    split: str = typer.Option("test", "--split", help="test (built as the run built it) or all (train + test)."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Text column of --dataset. [default: the run's]"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Label column of --dataset. [default: the run's]"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of saving it to <run>/evaluations.json."),
) -> None:
    """Re-evaluate a run's exported model (default: on the run's test split)."""
    import dataclasses
    import json

    from fedpeft.inference import evaluate_run, save_evaluation

    result, run_dir = evaluate_run(run, dataset, split, text_column, label_column)
    if as_json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return
    path = save_evaluation(run_dir, result)
    console.print(f"accuracy {result.accuracy:.4f}, loss {result.loss:.4f} on {result.examples:,} examples "
                  f"({result.dataset} [{result.split}]) -> {path}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and exit code 2 for every user mistake."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation chatter
    install_logging()  # fedpeft decides what prints, before any import's basicConfig (fedpeft/logs.py)
    try:
        app(args=argv, standalone_mode=False)
    except UsageError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.UsageError as exc:
        err_console.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


def run() -> None:
    """Console-script entry: :func:`main`, then exit without the interpreter's teardown.

    Tearing down torch, transformers, peft and datasets module by module took 1.1-1.2 s
    after every run (measured: 0.05 s with ``os._exit``). Every ``atexit`` handler still
    runs first (logging, temporary directories, multiprocessing), and output is flushed;
    all fedpeft files are written and closed before :func:`main` returns.
    """
    import atexit
    import os

    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
