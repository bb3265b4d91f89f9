"""Resolve and validate a run's settings against every component that reads them.

Defaults < config file < CLI flags (:func:`resolve`), then :func:`validate` checks each value
against the registries (adapters, strategies, codecs, backends, partitioners, accountants)
and the cross-component rules (e.g. strategy refusals under DP), raising one-line
:class:`UsageError` s. It sits above the components it consults; :mod:`fedpeft.config` stays
a leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fedpeft.config import RunConfig, load_toml
from fedpeft.errors import UsageError


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise UsageError(f"--{name.replace('_', '-')} {value!r} is invalid; allowed: {allowed}")


def validate(cfg: RunConfig) -> RunConfig:
    """The config with derived defaults filled in; raise :class:`UsageError` naming the first
    bad value and what is allowed."""
    if cfg.dp is None:  # --epsilon alone means user-level DP (the headline use)
        cfg = dataclasses.replace(cfg, dp="user" if cfg.has_budget else "none")
    _check_schedule(cfg)
    _check_components(cfg)
    cfg = _check_adapter(cfg)
    _check_data(cfg)
    cfg = _check_runtime(cfg)
    _check_privacy(cfg)
    _check_compression(cfg)
    _check_declared(cfg)
    return cfg


def _check_schedule(cfg: RunConfig) -> None:
    """Cohort, rounds and the local optimiser's numbers."""
    _check(cfg.clients >= 1, "clients", cfg.clients, "an integer >= 1")
    _check(1 <= cfg.cohort <= cfg.clients, "cohort", cfg.cohort, f"1..--clients ({cfg.clients})")
    _check(cfg.rounds >= 1, "rounds", cfg.rounds, "an integer >= 1")
    _check(cfg.local_epochs >= 1, "local_epochs", cfg.local_epochs, "an integer >= 1")
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "an integer >= 1")
    _check(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "a finite number > 0")
    _check(cfg.max_client_examples >= 0, "max_client_examples", cfg.max_client_examples,
           "an integer >= 0 (0 = no cap)")


def _check_components(cfg: RunConfig) -> None:
    """The named components (task, adapter, strategy, server optimiser, partitioner) and the
    settings that depend on which ones are chosen."""
    # imported here: registries import torch-heavy modules only when validating a run
    from fedpeft.adapters import ADAPTERS
    from fedpeft.data.partition import PARTITIONERS
    from fedpeft.strategy import STRATEGIES
    from fedpeft.tasks import TASKS

    _check(cfg.task in TASKS, "task", cfg.task, ", ".join(TASKS.names()))
    _check(cfg.adapter in ADAPTERS, "adapter", cfg.adapter, ", ".join(ADAPTERS.names()))
    _check(cfg.strategy in STRATEGIES, "strategy", cfg.strategy, ", ".join(STRATEGIES.names()))
    from fedpeft.server_optim import build_server_optimizer

    build_server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum, cfg.server_beta2,
                           cfg.server_tau)  # one-line UsageError naming a bad name or value
    _check(0 <= cfg.probe_rounds < cfg.rounds, "probe_rounds", cfg.probe_rounds,
           f"an integer in 0..{cfg.rounds - 1} (fewer than --rounds)")
    _check(math.isfinite(cfg.probe_lr) and cfg.probe_lr > 0, "probe_lr", cfg.probe_lr, "a finite number > 0")
    if cfg.probe_rounds and cfg.adapter == "head":
        raise UsageError(f"--probe-rounds {cfg.probe_rounds} trains the head before an adapter; with --adapter "
                         "head there is none; allowed: --probe-rounds 0")
    from fedpeft.training.precision import PRECISIONS

    _check(cfg.precision in PRECISIONS, "precision", cfg.precision,
           ", ".join(PRECISIONS.names()) + " (bf16: opt-in autocast of local training, changes the numbers)")
    _check(0 <= cfg.ema < 1, "ema", cfg.ema, "a number in [0, 1) (0 = evaluate the last iterate)")
    from fedpeft.reporting import check_tensorboard

    check_tensorboard(cfg.tensorboard)
    if cfg.server_opt != "none" and not STRATEGIES.get(cfg.strategy).supports_server_optimizer:
        raise UsageError(f"--server-opt {cfg.server_opt} cannot drive --strategy {cfg.strategy} (its global "
                         "state is rebuilt every round); allowed: --server-opt none")
    _check(cfg.partition in PARTITIONERS, "partition", cfg.partition, ", ".join(PARTITIONERS.names()))


def _check_adapter(cfg: RunConfig) -> RunConfig:
    """The adapter's shape: ranks, α, adapted layers and modules (``--train-top-k`` and
    ``--target-modules auto`` filled in)."""
    from fedpeft.tasks import get_task

    _check(1 <= cfg.rank <= 1024, "rank", cfg.rank, "an integer in 1..1024")
    _check(1 <= cfg.min_rank <= cfg.rank, "min_rank", cfg.min_rank, f"1..--rank ({cfg.rank})")
    try:
        client_ranks = cfg.client_rank_list
    except ValueError:
        client_ranks = [0]
    _check(all(1 <= r <= cfg.rank for r in client_ranks), "client_ranks", cfg.client_ranks,
           f"comma-separated integers in 1..--rank ({cfg.rank}), e.g. 2,4,8")
    _check(math.isfinite(cfg.alpha) and cfg.alpha > 0, "alpha", cfg.alpha, "a finite number > 0")
    try:
        layers = cfg.lora_layer_list
    except ValueError:
        layers = [-1]
    _check(all(0 <= x <= 1023 for x in layers), "lora_layers", cfg.lora_layers,
           "comma-separated encoder layer indices >= 0, e.g. 4,5 (the top two of six)")
    _check(0 <= cfg.train_top_k <= 1023, "train_top_k", cfg.train_top_k,
           "an integer >= 0: the number of top encoder layers to adapt (0 = --lora-layers decides)")
    if cfg.train_top_k:
        cfg = dataclasses.replace(cfg, lora_layers=_top_layers(cfg))
    cfg = get_task(cfg.task).complete(cfg)  # --target-modules auto: the model type's defaults
    _check(bool(cfg.target_module_list), "target_modules", cfg.target_modules,
           "a comma-separated list of module names, e.g. query,value, or auto")
    return cfg


def _check_data(cfg: RunConfig) -> None:
    """Model input, held-out splits, evaluation cadence and partition skew."""
    from fedpeft.model.loading import POOLINGS
    from fedpeft.tasks import get_task

    _check(cfg.pooling in POOLINGS, "pooling", cfg.pooling, ", ".join(POOLINGS))
    _check(8 <= cfg.max_length <= 512, "max_length", cfg.max_length, "an integer in 8..512")
    _check(0 < cfg.test_fraction < 0.5, "test_fraction", cfg.test_fraction, "a number in (0, 0.5)")
    _check(math.isfinite(cfg.validation_fraction) and 0 <= cfg.validation_fraction < 0.5, "validation_fraction",
           cfg.validation_fraction, "a number in [0, 0.5): the share of the training examples held out "
           "for validation (0 = none)")
    _check(cfg.validation_fraction == 0 or get_task(cfg.task).validates_on_train_rows, "validation_fraction",
           cfg.validation_fraction, f"0 with --task {cfg.task} (its evaluation has no validation split yet)")
    _check(cfg.eval_every >= 1, "eval_every", cfg.eval_every, "an integer >= 1")
    _check(cfg.max_test_examples >= 10, "max_test_examples", cfg.max_test_examples, "an integer >= 10")
    _check(math.isfinite(cfg.dirichlet_alpha) and cfg.dirichlet_alpha > 0, "dirichlet_alpha",
           cfg.dirichlet_alpha, "a finite number > 0")


def _check_runtime(cfg: RunConfig) -> RunConfig:
    """Simulated faults, round control and the backend (``auto`` resolved to the one that runs)."""
    from fedpeft.backends import AUTO, BACKENDS, POOL_MAX_CPUS_PER_CLIENT, choose_backend
    from fedpeft.ray_cluster import check_reachable, ray_address

    _check(0 <= cfg.dropout < 1, "dropout", cfg.dropout, "a probability in [0, 1)")
    _check(0 <= cfg.straggler_prob <= 1, "straggler_prob", cfg.straggler_prob, "a probability in [0, 1]")
    _check(math.isfinite(cfg.straggler_slowdown) and cfg.straggler_slowdown >= 1, "straggler_slowdown",
           cfg.straggler_slowdown, "a factor >= 1")
    _check(math.isfinite(cfg.deadline) and cfg.deadline >= 0, "deadline", cfg.deadline, "seconds >= 0 (0 = no deadline)")
    _check(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "an integer >= 0 (0 = no checkpoints)")
    _check(cfg.max_upload_bytes >= 0, "max_upload_bytes", cfg.max_upload_bytes, "bytes >= 0 (0 = automatic)")
    _check(math.isfinite(cfg.round_timeout) and 1 <= cfg.round_timeout <= 86400, "round_timeout",
           cfg.round_timeout, "seconds a round waits for replies, in [1, 86400]")
    address = ray_address(cfg)
    if cfg.backend == AUTO:  # results.json records the backend that ran
        cfg = dataclasses.replace(cfg, backend=choose_backend(address, cpus_per_client=cfg.cpus_per_client))
    _check(cfg.backend != "processes" or cfg.cpus_per_client < POOL_MAX_CPUS_PER_CLIENT, "cpus_per_client",
           cfg.cpus_per_client, f"below {POOL_MAX_CPUS_PER_CLIENT} with --backend processes (its forked workers run "
           "single-threaded: OpenMP's thread pool does not survive fork); --backend ray or inprocess for "
           "multi-threaded clients")
    _check(cfg.backend in BACKENDS, "backend", cfg.backend, ", ".join([AUTO, *BACKENDS.names()]))
    if cfg.backend == "ray" and address:
        check_reachable(address)
    _check(0 < cfg.cpus_per_client <= 64, "cpus_per_client", cfg.cpus_per_client, "a number in (0, 64]")
    return cfg


def _check_declared(cfg: RunConfig) -> None:
    """What each strategy, codec and stage declares (:mod:`fedpeft.options`), the plug-in stage
    names, and every refusal of the combination (strategy, stages, task)."""
    from fedpeft.compression import CODECS
    from fedpeft.options import check_options
    from fedpeft.pipeline import STAGES, refusals
    from fedpeft.strategy import STRATEGIES
    from fedpeft.tasks import get_task

    # the settings each strategy, codec and stage declares as its own (fedpeft.options)
    check_options([*(r.get(n) for r in (STRATEGIES, CODECS, STAGES) for n in r.names())], cfg)

    by_name = [n for n in STAGES.names() if STAGES.get(n).switched_by_name()]
    _check(all(name in by_name for name in cfg.stage_list), "stages", cfg.stages,
           f"comma-separated names of plug-in stages ({', '.join(by_name) or 'none registered'}); "
           "the built-in stages switch on from their own settings")
    # every strategy and stage refusal (e.g. LoRA-FAIR behind user-level DP), in one place,
    # then what the task cannot run with (e.g. the head adapter on a causal LM)
    refusal = refusals(cfg, STRATEGIES.get(cfg.strategy)) or get_task(cfg.task).refusal(cfg)
    if refusal is not None:
        raise UsageError(refusal)


def _top_layers(cfg: RunConfig) -> str:
    """``--train-top-k k`` as the ``lora_layers`` it means: the model's top k layer indices."""
    from fedpeft.model.loading import layer_count

    total = layer_count(cfg.model)
    _check(cfg.train_top_k <= total, "train_top_k", cfg.train_top_k,
           f"1..{total} (the encoder layers of --model {cfg.model})")
    top = ",".join(str(i) for i in range(total - cfg.train_top_k, total))
    if cfg.lora_layers and cfg.lora_layers != top:
        raise UsageError(f"--train-top-k {cfg.train_top_k} (layers {top}) contradicts --lora-layers "
                         f"{cfg.lora_layers!r}; give only one")
    return top


def _check_privacy(cfg: RunConfig) -> None:
    from fedpeft.privacy import ACCOUNTANTS

    _check(cfg.dp in ("none", "user", "sample"), "dp", cfg.dp, "none, user, sample")
    _check(cfg.accountant in ACCOUNTANTS, "accountant", cfg.accountant, ", ".join(ACCOUNTANTS.names()))
    budget = cfg.has_budget
    if cfg.adaptive_clip and cfg.dp != "user":
        raise UsageError("--adaptive-clip applies to --dp user only")
    if cfg.insecure_reproducible_noise and cfg.dp == "none":
        raise UsageError("--insecure-reproducible-noise applies to DP runs only (--dp user|sample); "
                         "runs without DP are reproducible from --seed already")
    if cfg.dp == "none":
        if budget or cfg.delta is not None:
            raise UsageError("--epsilon/--noise-multiplier/--delta contradict --dp none; "
                             "drop them or choose --dp user|sample")
        return
    if not budget:
        raise UsageError(f"--dp {cfg.dp} needs a budget: --epsilon E (calibrates the noise) "
                         "or --noise-multiplier Z")
    if cfg.epsilon is not None and cfg.noise_multiplier is not None:
        raise UsageError("--noise-multiplier and --epsilon are alternatives; give only one")
    if cfg.epsilon is not None:
        _check(math.isfinite(cfg.epsilon) and cfg.epsilon > 0, "epsilon", cfg.epsilon, "a finite number > 0")
    if cfg.noise_multiplier is not None:
        _check(math.isfinite(cfg.noise_multiplier) and cfg.noise_multiplier > 0, "noise_multiplier",
               cfg.noise_multiplier, "a finite number > 0")
    if cfg.delta is not None:
        _check(math.isfinite(cfg.delta) and 0 < cfg.delta < 1, "delta", cfg.delta, "a number in (0, 1/N)")
    if cfg.dp == "user":
        from fedpeft.privacy import default_delta

        delta = cfg.delta if cfg.delta is not None else default_delta(cfg.clients)
        _check(delta < 1 / cfg.clients, "delta", delta, f"a number in (0, 1/N) = (0, {1 / cfg.clients:.3g}) for N = {cfg.clients} clients")


def _check_compression(cfg: RunConfig) -> None:
    from fedpeft.compression import CODECS

    _check(cfg.compression in CODECS, "compression", cfg.compression, ", ".join(CODECS.names()))
    if cfg.compress_down and cfg.compression == "none":
        raise UsageError("--compress-down compresses the broadcast with the --compression codec, "
                         "but --compression is none; allowed: --compression compeft or stc")



def with_task_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over the defaults of the task they name (e.g. a causal LM, chat data and
    ``q_proj,v_proj`` targets for causal-lm): below the config file, flags and grid values."""
    from fedpeft.tasks import DEFAULT_TASK, TASKS

    task = values.get("task", DEFAULT_TASK)
    _check(task in TASKS, "task", task, ", ".join(TASKS.names()))
    return {**TASKS.get(task).defaults, **values}


def task_dependent() -> frozenset[str]:
    """The settings whose default depends on ``--task`` (named in some task's ``defaults``)."""
    from fedpeft.tasks import TASKS

    return frozenset(k for name in TASKS.names() for k in TASKS.get(name).defaults)


def resolve(cli_values: dict[str, Any], config_path: str | None = None) -> RunConfig:
    """Defaults < config file < CLI flags (``None`` CLI values mean "not given")."""
    values: dict[str, Any] = {}
    if config_path is not None:
        values.update(load_toml(config_path))
    values.update({k: v for k, v in cli_values.items() if v is not None})
    values = with_task_defaults(values)
    from fedpeft.planning.auto import auto_plan

    return validate(RunConfig(**auto_plan(values, lambda v: validate(RunConfig(**v)))))


__all__ = ["resolve", "task_dependent", "validate", "with_task_defaults"]
