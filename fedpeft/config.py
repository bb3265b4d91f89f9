"""The resolved, validated run configuration.

Data flows one way: CLI flags / TOML file -> :func:`resolve` -> :class:`RunConfig` (checked
once, here) -> ServerApp/ClientApp. Everything downstream trusts a ``RunConfig``.

Config files use the CLI option names (``local-epochs = 2`` or ``local_epochs = 2``) as flat
top-level keys; CLI flags override file values, which override the defaults below.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedpeft.errors import NotImplementedYet, UsageError

DEFAULT_MODEL = "embedded:all-MiniLM-L6-v2"
DEFAULT_DATASET = "rotten-tomatoes"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one federated run (also written to results.json ``config``)."""

    # federation
    clients: int = 100
    cohort: int = 10
    rounds: int = 8
    strategy: str = "fedavg"
    # local training
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-3
    max_client_examples: int = 0  # 0 = use the whole partition; >0 caps local data per round
    # adapter
    adapter: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    min_rank: int = 1
    target_modules: str = "query,value"
    # model and data
    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 64
    test_fraction: float = 0.1
    max_test_examples: int = 2000
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    # privacy (issue: user-level / sample-level DP)
    dp: str = "none"
    epsilon: float | None = None
    delta: float | None = None
    # runtime
    seed: int = 0
    cpus_per_client: float = 1.0
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flat, None-free form for Flower ConfigRecords / run_config (keys use dashes)."""
        return {k.replace("_", "-"): v for k, v in self.to_dict().items() if v is not None}

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_flat`; unknown keys are ignored (Flower adds its own)."""
        names = {f.name for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in flat.items()}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    f.name: ((float, int) if "float" in str(f.type) else (int,) if "int" in str(f.type) else (str,))
    for f in fields(RunConfig)
}


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise UsageError(f"--{name.replace('_', '-')} {value!r} is invalid; allowed: {allowed}")


def validate(cfg: RunConfig) -> RunConfig:
    """Raise :class:`UsageError` naming the first bad value and what is allowed."""
    # imported here: registries import torch-heavy modules only when validating a run
    from fedpeft.adapters import ADAPTERS
    from fedpeft.data.partition import PARTITIONERS
    from strategies import STRATEGIES

    _check(cfg.clients >= 1, "clients", cfg.clients, "an integer >= 1")
    _check(1 <= cfg.cohort <= cfg.clients, "cohort", cfg.cohort, f"1..--clients ({cfg.clients})")
    _check(cfg.rounds >= 1, "rounds", cfg.rounds, "an integer >= 1")
    _check(cfg.local_epochs >= 1, "local_epochs", cfg.local_epochs, "an integer >= 1")
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "an integer >= 1")
    _check(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "a finite number > 0")
    _check(cfg.max_client_examples >= 0, "max_client_examples", cfg.max_client_examples,
           "an integer >= 0 (0 = no cap)")
    _check(cfg.adapter in ADAPTERS, "adapter", cfg.adapter, ", ".join(ADAPTERS.names()))
    _check(cfg.strategy in STRATEGIES, "strategy", cfg.strategy, ", ".join(STRATEGIES.names()))
    _check(cfg.partition in PARTITIONERS, "partition", cfg.partition, ", ".join(PARTITIONERS.names()))
    _check(1 <= cfg.rank <= 1024, "rank", cfg.rank, "an integer in 1..1024")
    _check(1 <= cfg.min_rank <= cfg.rank, "min_rank", cfg.min_rank, f"1..--rank ({cfg.rank})")
    _check(math.isfinite(cfg.alpha) and cfg.alpha > 0, "alpha", cfg.alpha, "a finite number > 0")
    _check(bool(cfg.target_module_list), "target_modules", cfg.target_modules,
           "a comma-separated list of module names, e.g. query,value")
    _check(8 <= cfg.max_length <= 512, "max_length", cfg.max_length, "an integer in 8..512")
    _check(0 < cfg.test_fraction < 0.5, "test_fraction", cfg.test_fraction, "a number in (0, 0.5)")
    _check(cfg.max_test_examples >= 10, "max_test_examples", cfg.max_test_examples, "an integer >= 10")
    _check(math.isfinite(cfg.dirichlet_alpha) and cfg.dirichlet_alpha > 0, "dirichlet_alpha",
           cfg.dirichlet_alpha, "a finite number > 0")
    _check(0 < cfg.cpus_per_client <= 64, "cpus_per_client", cfg.cpus_per_client, "a number in (0, 64]")
    _check(cfg.dp in ("none", "user", "sample"), "dp", cfg.dp, "none, user, sample")
    if cfg.epsilon is not None or cfg.delta is not None or cfg.dp != "none":
        raise NotImplementedYet(
            "differential privacy (--epsilon/--delta/--dp) is not implemented yet; "
            "run without it (tracked in the privacy issue)"
        )
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML run config; one-line errors for missing/unreadable/unknown keys."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {str(path)!r} does not exist or is not a file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {str(path)!r} is not valid TOML: {exc}") from None
    return normalize_keys(data, source=str(path))


def normalize_keys(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Map dashed keys to field names and type-check each value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _FIELD_TYPES:
            allowed = ", ".join(sorted(k.replace("_", "-") for k in _FIELD_TYPES))
            raise UsageError(f"unknown key {key!r} in {source}; allowed: {allowed}")
        types = _FIELD_TYPES[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise UsageError(
                f"{key} = {value!r} in {source} has the wrong type; expected {types[0].__name__}"
            )
        out[name] = float(value) if types[0] is float else value
    return out


def resolve(cli_values: dict[str, Any], config_path: str | None = None) -> RunConfig:
    """Defaults < config file < CLI flags (``None`` CLI values mean "not given")."""
    values: dict[str, Any] = {}
    if config_path is not None:
        values.update(load_toml(config_path))
    values.update({k: v for k, v in cli_values.items() if v is not None})
    return validate(RunConfig(**values))


__all__ = ["RunConfig", "resolve", "validate", "load_toml", "DEFAULT_MODEL", "DEFAULT_DATASET", "field"]
