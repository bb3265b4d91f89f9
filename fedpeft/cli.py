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

from fedpeft.errors import UsageError
from fedpeft.logs import install as install_logging
from fedpeft.registry import declared_names
from fedpeft.reporting import optional_reporters
from fedpeft.results import FinalRecord, ResultsWriter, RoundRecord
from fedpeft.threads import passive_omp_wait

# before anything imports torch: libgomp reads it once, when torch loads it (fedpeft/threads.py)
passive_omp_wait()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Federated, differentially private fine-tuning of PEFT adapters.")
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def _names(package: str, registry: str) -> str:
    """The plug-in names a ``--flag`` accepts, for its help (read from source, not imported)."""
    return ", ".join(declared_names(package, registry))


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
def simulate(
    config: Optional[str] = typer.Option(None, "--config", help="TOML file of settings (CLI flags override it)."),
    clients: Optional[int] = typer.Option(None, "--clients", help="Number of simulated clients N. [default: 100]"),
    cohort: Optional[int] = typer.Option(None, "--cohort", help="Expected clients per round (Poisson rate cohort/N). [default: 10]"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Server rounds. [default: 10]"),
    local_epochs: Optional[int] = typer.Option(None, "--local-epochs", help="Local epochs per round. [default: 1]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Local batch size. [default: 8]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Client AdamW learning rate. [default: 3e-3]"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=f"Adapter: {_names('fedpeft.adapters', 'ADAPTERS')} (ffa-lora freezes the shared A: a larger --alpha is recommended). [default: lora]"),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank r (r_max for dylora/dp-dylora). [default: 8]"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha (scale alpha/r). [default: 16]"),
    min_rank: Optional[int] = typer.Option(None, "--min-rank", help="Smallest rank, drawn uniformly in [min-rank, rank] per step (dylora) or per round by the server (dp-dylora). [default: 1]"),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", help="Comma-separated module names to adapt, or auto (peft's default targets for the model's type: q_proj,v_proj for Llama, c_attn for GPT-2). [default: query,value; --task causal-lm: auto]"),
    lora_layers: Optional[str] = typer.Option(None, "--lora-layers", help="Encoder layers that get LoRA, e.g. 5 or 4,5 (the top k of the default's 6); fewer coordinates, less DP noise. [default: all]"),
    train_top_k: Optional[int] = typer.Option(None, "--train-top-k", help="Adapt only the top k encoder layers (LoRA there, the rest frozen): the frozen bottom runs once per example, not per client visit, so each visit costs ~k/L of the encoder. Alternative to --lora-layers. [default: 0 = all layers]"),
    bottom_cache: Optional[bool] = typer.Option(None, "--bottom-cache/--no-bottom-cache", help="Compute the frozen layers below the lowest adapted one once per example (disk-cached, memory-mapped); --no-bottom-cache runs the whole encoder every visit (same numbers, slower; for measuring). [default: on]"),
    client_ranks: Optional[str] = typer.Option(None, "--client-ranks", help="Per-client LoRA ranks, e.g. 2,4,8 (client i trains ranks[i mod len]; flora only). [default: --rank for all]"),
    strategy: Optional[str] = typer.Option(None, "--strategy", help=f"Server strategy: {_names('strategies', 'STRATEGIES')}. [default: fedavg]"),
    fair_solver: Optional[str] = typer.Option(None, "--fair-solver", help="LoRA-FAIR residual solver: sgd (paper) or ridge (closed form). [default: sgd]"),
    fair_lambda: Optional[float] = typer.Option(None, "--fair-lambda", help="LoRA-FAIR regulariser λ. [default: 0.01]"),
    server_opt: Optional[str] = typer.Option(None, "--server-opt", help="Server optimiser on the (noised) aggregate: none, fedavgm (server momentum), fedadam, fedyogi (Reddi et al. 2021). [default: none]"),
    server_lr: Optional[float] = typer.Option(None, "--server-lr", help="Server learning rate η. [default: 1]"),
    server_momentum: Optional[float] = typer.Option(None, "--server-momentum", help="β for fedavgm, β₁ for fedadam/fedyogi. [default: 0.9]"),
    server_beta2: Optional[float] = typer.Option(None, "--server-beta2", help="β₂ for fedadam/fedyogi. [default: 0.99]"),
    server_tau: Optional[float] = typer.Option(None, "--server-tau", help="Adaptivity τ for fedadam/fedyogi. [default: 1e-3]"),
    probe_rounds: Optional[int] = typer.Option(None, "--probe-rounds", help="LP-FT: the first K rounds train only the classification head (a linear probe), then the adapter starts from it; under user-level DP those rounds release only the head's coordinates (less noise, same ε per round). [default: 0]"),
    probe_lr: Optional[float] = typer.Option(None, "--probe-lr", help="Local learning rate of the head in the --probe-rounds. [default: 0.03]"),
    precision: Optional[str] = typer.Option(None, "--precision", help="Local training precision: fp32, or bf16 (opt-in: torch.autocast bfloat16 for the client's forward/backward; parameters, uploads and evaluation stay float32; ~1.5x cheaper client steps on CPUs with AVX512-BF16, accuracy cost in the README; refused with --dp sample). [default: fp32]"),
    ema: Optional[float] = typer.Option(None, "--ema", help="Evaluate and export the exponential moving average of the global model over rounds with this β (e.g. 0.9): it averages out the DP noise the last rounds added; post-processing, ε unchanged. [default: 0 = the last round's model]"),
    partition: Optional[str] = typer.Option(None, "--partition", help="iid or dirichlet. [default: iid]"),
    dirichlet_alpha: Optional[float] = typer.Option(None, "--dirichlet-alpha", help="Dirichlet concentration (smaller = more label skew). [default: 0.5]"),
    task: Optional[str] = typer.Option(None, "--task", help=f"What is learned: {_names('fedpeft.tasks', 'TASKS')} (causal-lm: instruction tuning of a causal LM on prompt/response pairs, loss on the answer tokens, evaluated by held-out loss and perplexity). [default: classification]"),
    model: Optional[str] = typer.Option(None, "--model", help="embedded:all-MiniLM-L6-v2, a local directory or a Hugging Face hub id."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="rotten-tomatoes, bbc-news, a local path or a hub id."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Text column of --dataset. [default: text]"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Label column of --dataset. [default: label]"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Token truncation length. [default: 64]"),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Sentence pooling of the classifier: auto (what the checkpoint declares: mean for sentence-transformers models, else the CLS pooler), mean, cls. [default: auto]"),
    dp: Optional[str] = typer.Option(None, "--dp", help="Privacy level: none, user (DP-FedAvg), sample (DP-SGD). [default: user if --epsilon/--noise-multiplier, else none]"),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help="Target ε over the whole run; calibrates the noise multiplier."),
    delta: Optional[float] = typer.Option(None, "--delta", help="Target δ. [default: min(1e-5, 1/N^1.1)]"),
    noise_multiplier: Optional[float] = typer.Option(None, "--noise-multiplier", help="Fixed noise multiplier z (alternative to --epsilon)."),
    clip: Optional[float] = typer.Option(None, "--clip", help="User level: L2 bound S of each client's update. [default: 0.5]"),
    adaptive_clip: Optional[bool] = typer.Option(None, "--adaptive-clip/--no-adaptive-clip", help="Adaptive clipping (Andrew et al. 2021) towards --target-quantile."),
    target_quantile: Optional[float] = typer.Option(None, "--target-quantile", help="Adaptive clipping: the quantile of update norms the clip norm tracks. [default: 0.5]"),
    clip_lr: Optional[float] = typer.Option(None, "--clip-lr", help="Adaptive clipping: geometric step size of the clip norm. [default: 0.2]"),
    sample_clip: Optional[float] = typer.Option(None, "--sample-clip", help="Sample level: per-example gradient bound C. [default: 1.0]"),
    accountant: Optional[str] = typer.Option(None, "--accountant", help="rdp or prv (Opacus). [default: rdp]"),
    insecure_reproducible_noise: Optional[bool] = typer.Option(None, "--insecure-reproducible-noise", help="Research only: derive DP noise, cohorts and DP-SGD batches from --seed so runs repeat exactly. The privacy guarantee then does NOT hold against anyone who knows the seed (recorded in results.json). [default: secret randomness]"),
    diagnostics: Optional[bool] = typer.Option(None, "--diagnostics", help="Also write the statistics a DP run does not publish (client train loss, realised cohort, rejections, compressed sizes, timings) to diagnostics_NOT_COVERED_BY_DP.json."),
    compression: Optional[str] = typer.Option(None, "--compression", help=f"Upload codec: {_names('fedpeft.compression', 'CODECS')}. [default: none]"),
    density: Optional[float] = typer.Option(None, "--density", help="Fraction of update entries kept by the sparsifying codecs (compeft, stc). [default: 0.2]"),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="ComPEFT magnitude scale γ (values ±γ·σ). [default: 1]"),
    compress_down: Optional[bool] = typer.Option(None, "--compress-down/--no-compress-down", help="Also compress the server broadcast."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Plug-in update-pipeline stages to switch on, comma-separated (see README, 'The update pipeline'; the built-in stages switch on from --compression, --dp, --strategy, --client-ranks). [default: none]"),
    test_fraction: Optional[float] = typer.Option(None, "--test-fraction", help="Held-out fraction of a dataset without a test split. [default: 0.1]"),
    validation_fraction: Optional[float] = typer.Option(None, "--validation-fraction", help="Hold this fraction of the training examples out as a validation split before partitioning (stratified, the same rows for every --seed; no client holds them) and score the model on it when the test set is scored, e.g. to choose ComPEFT's --gamma ([compare] tune). [default: 0 = none]"),
    max_test_examples: Optional[int] = typer.Option(None, "--max-test-examples", help="Cap on held-out test examples evaluated. [default: 2000]"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate the global model every K rounds (always after the last). [default: 1]"),
    max_client_examples: Optional[int] = typer.Option(None, "--max-client-examples", help="Cap on examples a client trains on per round (0 = all). [default: 0]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed. [default: 0]"),
    backend: Optional[str] = typer.Option(None, "--backend", help="auto (ray with --ray-address or $RAY_ADDRESS, else processes on Linux), ray (Flower's Ray backend), processes (forked workers on this machine sharing one model copy) or inprocess (no workers, clients one after another). [default: auto]"),
    cpus_per_client: Optional[float] = typer.Option(None, "--cpus-per-client", help="Ray CPUs per client actor. [default: 1]"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (host:port or auto) so clients run on its nodes; the round loop stays here. [default: $RAY_ADDRESS, else a local Ray on 127.0.0.1]"),
    output: Optional[str] = typer.Option(None, "--output", help="Run directory. [default: runs/<timestamp>]"),
    tensorboard: Optional[str] = typer.Option(None, "--tensorboard", help="Also log the per-round numbers of rounds.csv (under DP only the published ones) as TensorBoard scalars to DIR/<run name>; needs the tensorboard package (pip install 'fedpeft[tensorboard]'). [default: off]"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Write an atomic checkpoint every K rounds. [default: 0 = never]"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Probability that a sampled client fails to return. [default: 0]"),
    straggler_prob: Optional[float] = typer.Option(None, "--straggler-prob", help="Probability that a sampled client is slowed down by --straggler-slowdown. [default: 0]"),
    straggler_slowdown: Optional[float] = typer.Option(None, "--straggler-slowdown", help="A straggler's training takes this many times longer. [default: 10]"),
    max_upload_bytes: Optional[int] = typer.Option(None, "--max-upload-bytes", help="Replies larger than this are rejected. [default: 0 = 2x an honest dense upload]"),
    round_timeout: Optional[float] = typer.Option(None, "--round-timeout", help="Seconds a round waits for replies. [default: 1800]"),
    deadline: Optional[float] = typer.Option(None, "--deadline", help="Round deadline in seconds of client time; later replies are dropped. [default: 0 = none]"),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint (no other settings)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower and Ray logs."),
) -> None:
    """Simulate a federation and write results.json / rounds.csv to --output."""
    values = {k: v for k, v in locals().items() if k not in ("config", "verbose", "resume")}
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
