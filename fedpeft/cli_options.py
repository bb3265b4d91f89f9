"""The run settings ``fedpeft simulate`` (and ``fedpeft plan``) take as flags: one table, so
the command is a short function and a new setting is one line here (and its RunConfig field).

Every flag defaults to None, meaning "not given": :func:`fedpeft.settings.resolve` fills the
defaults in after the --config file, so a flag given explicitly always wins.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Optional

import typer

from fedpeft.registry import declared_names


def plugin_names(package: str, registry: str) -> str:
    """The plug-in names a ``--flag`` accepts, for its help (read from source, not imported)."""
    return ", ".join(declared_names(package, registry))


#: (parameter name, type, flag(s), help), in --help order
RUN_OPTIONS: list[tuple[str, type, str, str]] = [
    ("clients", int, "--clients", "Number of simulated clients N. [default: 100]"),
    ("cohort", int, "--cohort", "Expected clients per round (Poisson rate cohort/N). [default: 10]"),
    ("rounds", int, "--rounds", "Server rounds. [default: 10]"),
    ("local_epochs", int, "--local-epochs", "Local epochs per round. [default: 1]"),
    ("batch_size", int, "--batch-size", "Local batch size. [default: 8]"),
    ("lr", float, "--lr", "Client AdamW learning rate. [default: 3e-3]"),
    ("adapter", str, "--adapter", f"Adapter: {plugin_names('fedpeft.adapters', 'ADAPTERS')} (ffa-lora freezes the shared A: a larger --alpha is recommended). [default: lora]"),
    ("rank", int, "--rank", "LoRA rank r (r_max for dylora/dp-dylora). [default: 8]"),
    ("alpha", float, "--alpha", "LoRA alpha (scale alpha/r). [default: 16]"),
    ("min_rank", int, "--min-rank", "Smallest rank, drawn uniformly in [min-rank, rank] per step (dylora) or per round by the server (dp-dylora). [default: 1]"),
    ("target_modules", str, "--target-modules", "Comma-separated module names to adapt, or auto (peft's default targets for the model's type: q_proj,v_proj for Llama, c_attn for GPT-2). [default: query,value; --task causal-lm: auto]"),
    ("lora_layers", str, "--lora-layers", "Encoder layers that get LoRA, e.g. 5 or 4,5 (the top k of the default's 6); fewer coordinates, less DP noise. [default: all]"),
    ("train_top_k", int, "--train-top-k", "Adapt only the top k encoder layers (LoRA there, the rest frozen): the frozen bottom runs once per example, not per client visit, so each visit costs ~k/L of the encoder. Alternative to --lora-layers. [default: 0 = all layers]"),
    ("bottom_cache", bool, "--bottom-cache/--no-bottom-cache", "Compute the frozen layers below the lowest adapted one once per example (disk-cached, memory-mapped); --no-bottom-cache runs the whole encoder every visit (same numbers, slower; for measuring). [default: on]"),
    ("client_ranks", str, "--client-ranks", "Per-client LoRA ranks, e.g. 2,4,8 (client i trains ranks[i mod len]; flora only). [default: --rank for all]"),
    ("strategy", str, "--strategy", f"Server strategy: {plugin_names('strategies', 'STRATEGIES')}. [default: fedavg]"),
    ("fair_solver", str, "--fair-solver", "LoRA-FAIR residual solver: sgd (paper) or ridge (closed form). [default: sgd]"),
    ("fair_lambda", float, "--fair-lambda", "LoRA-FAIR regulariser λ. [default: 0.01]"),
    ("server_opt", str, "--server-opt", "Server optimiser on the (noised) aggregate: none, fedavgm (server momentum), fedadam, fedyogi (Reddi et al. 2021). [default: none]"),
    ("server_lr", float, "--server-lr", "Server learning rate η. [default: 1]"),
    ("server_momentum", float, "--server-momentum", "β for fedavgm, β₁ for fedadam/fedyogi. [default: 0.9]"),
    ("server_beta2", float, "--server-beta2", "β₂ for fedadam/fedyogi. [default: 0.99]"),
    ("server_tau", float, "--server-tau", "Adaptivity τ for fedadam/fedyogi. [default: 1e-3]"),
    ("probe_rounds", int, "--probe-rounds", "LP-FT: the first K rounds train only the classification head (a linear probe), then the adapter starts from it; under user-level DP those rounds release only the head's coordinates (less noise, same ε per round). [default: 0]"),
    ("probe_lr", float, "--probe-lr", "Local learning rate of the head in the --probe-rounds. [default: 0.03]"),
    ("precision", str, "--precision", "Local training precision: fp32, or bf16 (opt-in: torch.autocast bfloat16 for the client's forward/backward; parameters, uploads and evaluation stay float32; ~1.5x cheaper client steps on CPUs with AVX512-BF16, accuracy cost in the README; refused with --dp sample). [default: fp32]"),
    ("ema", float, "--ema", "Evaluate and export the exponential moving average of the global model over rounds with this β (e.g. 0.9): it averages out the DP noise the last rounds added; post-processing, ε unchanged. [default: 0 = the last round's model]"),
    ("partition", str, "--partition", "iid or dirichlet. [default: iid]"),
    ("dirichlet_alpha", float, "--dirichlet-alpha", "Dirichlet concentration (smaller = more label skew). [default: 0.5]"),
    ("task", str, "--task", f"What is learned: {plugin_names('fedpeft.tasks', 'TASKS')} (causal-lm: instruction tuning of a causal LM on prompt/response pairs, loss on the answer tokens, evaluated by held-out loss and perplexity). [default: classification]"),
    ("model", str, "--model", "embedded:all-MiniLM-L6-v2, a local directory or a Hugging Face hub id."),
    ("dataset", str, "--dataset", "rotten-tomatoes, bbc-news, a local path or a hub id."),
    ("text_column", str, "--text-column", "Text column of --dataset. [default: text]"),
    ("label_column", str, "--label-column", "Label column of --dataset. [default: label]"),
    ("max_length", int, "--max-length", "Token truncation length. [default: 64]"),
    ("pooling", str, "--pooling", "Sentence pooling of the classifier: auto (what the checkpoint declares: mean for sentence-transformers models, else the CLS pooler), mean, cls. [default: auto]"),
    ("dp", str, "--dp", "Privacy level: none, user (DP-FedAvg), sample (DP-SGD). [default: user if --epsilon/--noise-multiplier, else none]"),
    ("epsilon", float, "--epsilon", "Target ε over the whole run; calibrates the noise multiplier."),
    ("delta", float, "--delta", "Target δ. [default: min(1e-5, 1/N^1.1)]"),
    ("noise_multiplier", float, "--noise-multiplier", "Fixed noise multiplier z (alternative to --epsilon)."),
    ("clip", float, "--clip", "User level: L2 bound S of each client's update. [default: 0.5]"),
    ("adaptive_clip", bool, "--adaptive-clip/--no-adaptive-clip", "Adaptive clipping (Andrew et al. 2021) towards --target-quantile."),
    ("target_quantile", float, "--target-quantile", "Adaptive clipping: the quantile of update norms the clip norm tracks. [default: 0.5]"),
    ("clip_lr", float, "--clip-lr", "Adaptive clipping: geometric step size of the clip norm. [default: 0.2]"),
    ("sample_clip", float, "--sample-clip", "Sample level: per-example gradient bound C. [default: 1.0]"),
    ("accountant", str, "--accountant", "rdp or prv (Opacus). [default: rdp]"),
    ("insecure_reproducible_noise", bool, "--insecure-reproducible-noise", "Research only: derive DP noise, cohorts and DP-SGD batches from --seed so runs repeat exactly. The privacy guarantee then does NOT hold against anyone who knows the seed (recorded in results.json). [default: secret randomness]"),
    ("diagnostics", bool, "--diagnostics", "Also write the statistics a DP run does not publish (client train loss, realised cohort, rejections, compressed sizes, timings) to diagnostics_NOT_COVERED_BY_DP.json."),
    ("compression", str, "--compression", f"Upload codec: {plugin_names('fedpeft.compression', 'CODECS')}. [default: none]"),
    ("density", float, "--density", "Fraction of update entries kept by the sparsifying codecs (compeft, stc). [default: 0.2]"),
    ("gamma", float, "--gamma", "ComPEFT magnitude scale γ (values ±γ·σ). [default: 1]"),
    ("compress_down", bool, "--compress-down/--no-compress-down", "Also compress the server broadcast."),
    ("stages", str, "--stages", "Plug-in update-pipeline stages to switch on, comma-separated (see README, 'The update pipeline'; the built-in stages switch on from --compression, --dp, --strategy, --client-ranks). [default: none]"),
    ("test_fraction", float, "--test-fraction", "Held-out fraction of a dataset without a test split. [default: 0.1]"),
    ("validation_fraction", float, "--validation-fraction", "Hold this fraction of the training examples out as a validation split before partitioning (stratified, the same rows for every --seed; no client holds them) and score the model on it when the test set is scored, e.g. to choose ComPEFT's --gamma ([compare] tune). [default: 0 = none]"),
    ("max_test_examples", int, "--max-test-examples", "Cap on held-out test examples evaluated. [default: 2000]"),
    ("eval_every", int, "--eval-every", "Evaluate the global model every K rounds (always after the last). [default: 1]"),
    ("max_client_examples", int, "--max-client-examples", "Cap on examples a client trains on per round (0 = all). [default: 0]"),
    ("seed", int, "--seed", "Run seed. [default: 0]"),
    ("backend", str, "--backend", "auto (ray with --ray-address or $RAY_ADDRESS, else processes on Linux), ray (Flower's Ray backend), processes (forked workers on this machine sharing one model copy) or inprocess (no workers, clients one after another). [default: auto]"),
    ("cpus_per_client", float, "--cpus-per-client", "Ray CPUs per client actor. [default: 1]"),
    ("ray_address", str, "--ray-address", "Join this Ray cluster (host:port or auto) so clients run on its nodes; the round loop stays here. [default: $RAY_ADDRESS, else a local Ray on 127.0.0.1]"),
    ("output", str, "--output", "Run directory. [default: runs/<timestamp>]"),
    ("tensorboard", str, "--tensorboard", "Also log the per-round numbers of rounds.csv (under DP only the published ones) as TensorBoard scalars to DIR/<run name>; needs the tensorboard package (pip install 'fedpeft[tensorboard]'). [default: off]"),
    ("checkpoint_every", int, "--checkpoint-every", "Write an atomic checkpoint every K rounds. [default: 0 = never]"),
    ("dropout", float, "--dropout", "Probability that a sampled client fails to return. [default: 0]"),
    ("straggler_prob", float, "--straggler-prob", "Probability that a sampled client is slowed down by --straggler-slowdown. [default: 0]"),
    ("straggler_slowdown", float, "--straggler-slowdown", "A straggler's training takes this many times longer. [default: 10]"),
    ("max_upload_bytes", int, "--max-upload-bytes", "Replies larger than this are rejected. [default: 0 = 2x an honest dense upload]"),
    ("round_timeout", float, "--round-timeout", "Seconds a round waits for replies. [default: 1800]"),
    ("deadline", float, "--deadline", "Round deadline in seconds of client time; later replies are dropped. [default: 0 = none]"),
]


def with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command(values, **own)`` as a typer command that also takes every flag of
    :data:`RUN_OPTIONS` (in the place of its ``values`` parameter); ``values`` holds them by
    name, None where not given."""
    own = inspect.signature(command).parameters
    names = [name for name, *_ in RUN_OPTIONS]
    run = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(None, flag, help=text),
                             annotation=Optional[kind])
           for name, kind, flag, text in RUN_OPTIONS]
    params = []
    for p in own.values():
        keyword = p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        params.extend(run if p.name == "values" else [keyword])

    @functools.wraps(command)
    def wrapped(**kwargs: Any) -> None:
        command(values={n: kwargs.pop(n) for n in names}, **kwargs)

    wrapped.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    wrapped.__annotations__ = {p.name: p.annotation for p in params}
    del wrapped.__wrapped__  # typer must read the signature above, not the command's own
    return wrapped
