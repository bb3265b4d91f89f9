"""The run configuration: every setting of one run, and reading it from TOML.

Data flows one way: CLI flags / TOML file -> :func:`fedpeft.settings.resolve` ->
:class:`RunConfig` (checked once, there, against the registries) -> ServerApp/ClientApp.
Everything downstream trusts a ``RunConfig``. This module imports nothing of fedpeft but its
errors and the registry, so every layer can depend on it.

A client is not sent the whole config: a message carries only the settings the run's
client-side components declare (:meth:`RunConfig.to_client_flat`), and the client reads it
back as a :class:`ClientConfig`, on which reading any other setting raises.

Config files use the CLI option names (``local-epochs = 2`` or ``local_epochs = 2``) as flat
top-level keys; CLI flags override file values, which override the defaults below.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedpeft.errors import UsageError
from fedpeft.registry import Registry

DEFAULT_MODEL = "embedded:all-MiniLM-L6-v2"
DEFAULT_DATASET = "rotten-tomatoes"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one federated run (also written to results.json ``config``)."""

    # federation
    clients: int = 100
    cohort: int = 10
    rounds: int = 10
    strategy: str = "fedavg"
    fair_solver: str = "sgd"  # LoRA-FAIR residual solver: sgd (paper) | ridge (closed form)
    fair_lambda: float = 0.01  # LoRA-FAIR regulariser λ
    # server optimiser on the (noised) aggregate, SPEC §3.6: none | fedavgm | fedadam | fedyogi
    server_opt: str = "none"
    server_lr: float = 1.0
    server_momentum: float = 0.9  # β (fedavgm) / β₁ (fedadam, fedyogi)
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    #: EMA coefficient β of the iterate average that is evaluated and exported
    #: (fedpeft.iterate_average; post-processing under DP); 0 = the last iterate
    ema: float = 0.0
    # local training
    local_epochs: int = 1
    batch_size: int = 8
    lr: float = 3e-3
    max_client_examples: int = 0  # 0 = use the whole partition; >0 caps local data per round
    #: LP-FT (fedpeft.training.probe): rounds 1..K train the classification head alone
    probe_rounds: int = 0
    probe_lr: float = 0.03  # the head's local lr in those rounds (the head candidate's recipe)
    #: local training's matmul precision (fedpeft.training.precision): fp32 | bf16 (opt-in autocast)
    precision: str = "fp32"
    # adapter
    adapter: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    min_rank: int = 1
    target_modules: str = "query,value"
    #: encoder layers that get LoRA, e.g. "5" or "4,5" (the top k of a 6-layer model); "" = all
    lora_layers: str = ""
    #: adapt only the top k encoder layers (sets lora_layers to them); 0 = --lora-layers decides
    train_top_k: int = 0
    #: run the frozen layers below the lowest adapted one once per example, not per client
    #: visit (fedpeft.model.frozen_bottom); off only to measure what it saves
    bottom_cache: bool = True
    #: per-client LoRA ranks, e.g. "2,4,8" (client i trains rank ranks[i % len]); "" = --rank
    client_ranks: str = ""
    # model and data
    #: what is learned (fedpeft.tasks): classification | causal-lm
    task: str = "classification"
    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 64
    pooling: str = "auto"  # auto (what the checkpoint declares) | mean | cls
    test_fraction: float = 0.1
    #: fraction of the training examples held out as a validation split before partitioning
    #: (no client holds them; the server scores the model on them, e.g. to choose ComPEFT's γ);
    #: 0 = none, every training example goes to the clients
    validation_fraction: float = 0.0
    max_test_examples: int = 2000
    eval_every: int = 1  # evaluate the global model every K rounds (and always after the last)
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    # privacy (SPEC §3)
    dp: str | None = None  # none | user | sample; None = "user" if a budget is given else "none"
    epsilon: float | None = None
    delta: float | None = None  # None = min(1e-5, 1/N^1.1)
    noise_multiplier: float | None = None
    clip: float = 0.5  # user level: L2 bound S of a client's whole upload
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    sample_clip: float = 1.0  # sample level: per-example gradient bound C
    accountant: str = "rdp"
    #: research opt-in: derive DP noise, cohorts and DP-SGD batches from --seed. The run then
    #: has NO privacy guarantee against anyone who knows the seed (recorded in results.json).
    insecure_reproducible_noise: bool = False
    #: also write the client-reported statistics a DP run does not publish to a separate file
    #: marked as not covered by the guarantee (fedpeft.privacy.publication)
    diagnostics: bool = False
    # compression (SPEC §2.3)
    compression: str = "none"
    density: float = 0.2
    gamma: float = 1.0
    compress_down: bool = False
    #: extra update-pipeline stages by name, comma-separated (fedpeft.pipeline.STAGES); the
    #: built-in ones switch on from their own options (--compression, --dp, ...)
    stages: str = ""
    # runtime
    seed: int = 0
    # faults and update validation
    dropout: float = 0.0  # probability that a sampled client fails to return
    straggler_prob: float = 0.0  # probability that a sampled client is slowed down
    straggler_slowdown: float = 10.0  # a straggler's training takes this many times longer
    deadline: float = 0.0  # round deadline in seconds of (simulated) client time; 0 = none
    max_upload_bytes: int = 0  # larger replies are rejected; 0 = 2x an honest dense upload
    checkpoint_every: int = 0  # write an atomic checkpoint every K rounds (0 = never)
    #: seconds a round waits for replies. A crashed SuperNode is reported by the SuperLink after
    #: 2 missed heartbeats (about a minute); this bounds a node that is alive but stuck.
    round_timeout: float = 1800.0
    backend: str = "auto"  # auto | ray (Flower simulation engine) | processes (forked pool) | inprocess (sequential)
    cpus_per_client: float = 1.0
    #: Ray cluster to join ("host:port", "auto"); empty: $RAY_ADDRESS, else a local Ray on 127.0.0.1
    ray_address: str = ""
    output: str | None = None
    #: also log the per-round numbers of rounds.csv as TensorBoard scalars to DIR/<run name>
    #: (fedpeft.reporting.TensorBoardReporter; needs the optional tensorboard package)
    tensorboard: str | None = None
    #: why the planner chose settings the user did not give (fedpeft.planning.auto.auto_plan); ""
    #: when the user set them
    planned: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flat, None-free form for Flower ConfigRecords / run_config (keys use dashes)."""
        return {k.replace("_", "-"): v for k, v in self.to_dict().items() if v is not None}

    def with_changes(self, **changes: Any) -> RunConfig:  # noqa: ANN401 - setting values
        """This config with ``changes`` (:func:`dataclasses.replace`, which a
        :class:`ClientConfig` refuses: it would read every setting)."""
        return dataclasses.replace(self, **changes)

    def to_client_flat(self) -> dict[str, bool | int | float | str]:
        """What every train and evaluate message carries: exactly the settings the run's
        client-side components declare (``fedpeft.engine.client_settings``), never the whole
        config; beside them, which client stages to build (:data:`STAGES_KEY`), which declared
        settings are None (:data:`UNSET_KEY`: a record holds no None) and whether the run is
        private (:data:`PRIVATE_KEY`). A client reads it back with :meth:`ClientConfig.from_flat`."""
        declared = CLIENT_DECLARATIONS.get("run")(self)
        values = {name: getattr(self, name) for name in _FIELD_NAMES if name in declared.settings}
        flat: dict[str, bool | int | float | str] = {
            name.replace("_", "-"): value for name, value in values.items() if value is not None}
        flat[STAGES_KEY] = ",".join(declared.stages)
        flat[UNSET_KEY] = ",".join(name for name, value in values.items() if value is None)
        flat[PRIVATE_KEY] = self.private
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_flat`; unknown keys are ignored (Flower adds its own)."""
        names = {f.name for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in flat.items()}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def private(self) -> bool:
        """The run has a DP guarantee (``--dp user|sample``, or a budget that implies it)."""
        return self.dp not in (None, "none") or self.has_budget

    @property
    def has_budget(self) -> bool:
        """A privacy budget was given (``--epsilon`` or ``--noise-multiplier``): alone it means
        user-level DP, and with ``--dp none`` it is refused (settings.validate)."""
        return self.epsilon is not None or self.noise_multiplier is not None

    @property
    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    @property
    def lora_layer_list(self) -> list[int]:
        """``lora_layers`` parsed ([] = every layer); raises ValueError on a non-integer."""
        return [int(x) for x in self.lora_layers.split(",") if x.strip()]

    @property
    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]

    @property
    def client_rank_list(self) -> list[int]:
        """``client_ranks`` parsed ([] when unset); raises ValueError on a non-integer."""
        return [int(r) for r in self.client_ranks.split(",") if r.strip()]

    def client_rank(self, client_id: int) -> int | None:
        """The LoRA rank client ``client_id`` trains (None: the run's ``rank``). Server and
        clients both derive it from the client's identity, so nothing extra is sent."""
        ranks = self.client_rank_list
        return ranks[client_id % len(ranks)] if ranks else None


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RunConfig))

#: message keys beside the settings (:meth:`RunConfig.to_client_flat`): the client stages to
#: build, comma-separated (the server evaluated :meth:`fedpeft.pipeline.Stage.active`); the
#: declared settings whose value is None; whether the run is private (a DP run's clients log
#: nothing that names who was sampled, :mod:`fedpeft.federation.message_timing`)
STAGES_KEY = "client-stages"
UNSET_KEY = "settings-unset"
PRIVATE_KEY = "private-run"


@dataclass(frozen=True)
class ClientDeclaration:
    """What a run's client-side components declare (``fedpeft.engine.client_settings``)."""

    #: the ``RunConfig`` fields they read
    settings: frozenset[str]
    #: the stages whose client halves run, by name
    stages: tuple[str, ...]


#: run config -> its :class:`ClientDeclaration`. The declaring components (task, adapter,
#: training modes, stages) sit above this module, so their gatherer is reached by name, the way
#: a registry reaches its plug-ins: ``fedpeft.engine.client_settings`` registers ``"run"``.
CLIENT_DECLARATIONS: Registry[Callable[[RunConfig], ClientDeclaration]] = Registry(
    "client settings declaration", plugins="fedpeft.engine.client_settings")


class UndeclaredSetting(RuntimeError):
    """A client read a setting that no client-side component of its run declares, so the server
    did not send it (not an AttributeError: ``getattr(cfg, name, default)`` must not hide it)."""


class ClientConfig(RunConfig):
    """A run config as a client receives it (:meth:`RunConfig.to_client_flat`): the declared
    settings; reading any other raises :class:`UndeclaredSetting` instead of silently giving a
    default the server never chose. Also carries :attr:`client_stages` and :attr:`private`.

    Built only by :meth:`from_flat`; :meth:`with_changes` derives another (``dataclasses.replace``
    and ``to_dict`` read every setting, so they raise)."""

    #: the stages whose client halves run, as the server named them
    client_stages: tuple[str, ...]

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> ClientConfig:
        """The settings in a message; keys that are not settings are ignored (round keys,
        Flower's own). A message not built by :meth:`RunConfig.to_client_flat` is refused."""
        if STAGES_KEY not in flat:
            raise ValueError(f"not a client message (no {STAGES_KEY!r}): built by RunConfig.to_client_flat?")
        values = {k.replace("-", "_"): v for k, v in flat.items() if k.replace("-", "_") in _FIELD_NAMES}
        values.update({name: None for name in _names(str(flat.get(UNSET_KEY, "")))})
        return cls._received(values, tuple(_names(str(flat[STAGES_KEY]))), bool(flat.get(PRIVATE_KEY, True)))

    @classmethod
    def _received(cls, values: dict[str, Any], stages: tuple[str, ...], private: bool) -> ClientConfig:
        cfg = cls(**values)
        object.__setattr__(cfg, "_withheld", frozenset(_FIELD_NAMES) - values.keys())
        object.__setattr__(cfg, "client_stages", stages)
        object.__setattr__(cfg, "_private", private)
        return cfg

    def __getattribute__(self, name: str) -> Any:  # noqa: ANN401 - any attribute
        if name in object.__getattribute__(self, "__dict__").get("_withheld", ()):
            raise UndeclaredSetting(
                f"setting {name!r} was read on a client, but no client-side component of this run "
                "declares it, so the server did not send it; declare it beside the code that reads it "
                "(see fedpeft.engine.client_settings)")
        return object.__getattribute__(self, name)

    def _sent(self) -> tuple[tuple[str, Any], ...]:
        """(name, value) of every setting received, in field order."""
        own = object.__getattribute__(self, "__dict__")
        return tuple((n, own[n]) for n in _FIELD_NAMES if n not in own["_withheld"])

    def _identity(self) -> tuple[Any, ...]:
        own = object.__getattribute__(self, "__dict__")
        return self._sent(), own["client_stages"], own["_private"]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClientConfig) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        return f"ClientConfig({', '.join(f'{n}={v!r}' for n, v in self._sent())})"

    @property
    def private(self) -> bool:
        """The run is private, as the server said (its ``dp``/``epsilon`` need not be sent)."""
        return bool(object.__getattribute__(self, "__dict__")["_private"])

    def with_changes(self, **changes: Any) -> ClientConfig:  # noqa: ANN401 - setting values
        own = object.__getattribute__(self, "__dict__")
        return ClientConfig._received({**dict(self._sent()), **changes}, own["client_stages"], own["_private"])


def _names(joined: str) -> list[str]:
    return [n for n in joined.split(",") if n]


def _types(annotation: str) -> tuple[type, ...]:
    for name, types in (("bool", (bool,)), ("float", (float, int)), ("int", (int,))):
        if name in annotation:
            return types
    return (str,)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {f.name: _types(str(f.type)) for f in fields(RunConfig)}


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; one-line :class:`UsageError` (naming ``what``) if missing or invalid."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {str(path)!r} is not valid TOML: {exc}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML run config; one-line errors for missing/unreadable/unknown keys."""
    return normalize_keys(read_toml(path, "--config"), source=str(path))


def normalize_keys(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Map dashed keys to field names and type-check each value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _FIELD_TYPES:
            allowed = ", ".join(sorted(k.replace("_", "-") for k in _FIELD_TYPES))
            raise UsageError(f"unknown key {key!r} in {source}; allowed: {allowed}")
        types = _FIELD_TYPES[name]
        if (isinstance(value, bool) and types != (bool,)) or not isinstance(value, types):
            raise UsageError(
                f"{key} = {value!r} in {source} has the wrong type; expected {types[0].__name__}"
            )
        out[name] = float(value) if types[0] is float else value
    return out


__all__ = ["CLIENT_DECLARATIONS", "PRIVATE_KEY", "STAGES_KEY", "UNSET_KEY", "ClientConfig", "ClientDeclaration",
           "RunConfig", "UndeclaredSetting", "load_toml", "read_toml", "normalize_keys", "DEFAULT_MODEL", "DEFAULT_DATASET", "field"]
