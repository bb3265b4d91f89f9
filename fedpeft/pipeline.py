"""The update pipeline: every mechanism that transforms a client update is a :class:`Stage`.

In the spirit of pfl-research's postprocessors (``pfl/postprocessor/base.py``): one small
interface with a client half and a server half, and the mechanisms (keeping FedSA-LoRA's
``B`` at home, rank truncation, error-feedback compression, sample-level DP-SGD, user-level
clip + noise) are implementations of it, chained in one explicit order::

    client:  train → stage₁.on_client → stage₂.on_client → … → send
    server:  receive → … → stage₂.decode → stage₁.decode → check → stage₁.on_server → … → aggregate

The server undoes the client halves in reverse (a codec's ``decode`` runs first), checks
every reply against the honest layout the stages declare, then runs the cohort-level
halves in order (user-level DP turns the cohort into one noised pseudo-update). Only then
does the strategy aggregate (:mod:`fedpeft.strategy`): a strategy knows nothing about
compression or DP, and a stage nothing about the strategy beyond its declared flags.

A stage owns its whole mechanism, client half included: besides transforming the update it
may prepare the client's model before local training (:meth:`Stage.before_training`, e.g.
FedSA-LoRA's own ``B``), act after every optimizer step (:meth:`Stage.after_step`, e.g. the
rank cap), keep state and report metrics after training (:meth:`Stage.after_training`), ask
for a client training procedure (:attr:`Stage.training`, e.g. DP-SGD) and declare the
settings its client half reads (:meth:`Stage.client_settings`: a client is sent only those).
The client runs these hooks through the pipeline and never asks which stage is which.

A new stage is one file in :mod:`fedpeft.stages` (or any package imported before the run)
registering a subclass in :data:`STAGES`; it switches itself on from the run config in
:meth:`Stage.active` (default: when its name is listed in ``--stages``). The server decides
which stages are active and names the client halves in every message, so a client needs no
setting that only switches a stage on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from fedpeft.adapters.base import StepHook
from fedpeft.layout import Layout, layout_of
from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.engine.client import LocalTask
    from fedpeft.privacy.randomness import RandomStreams
    from fedpeft.strategy import ClientUpdate, FedPeftStrategy

State = dict[str, torch.Tensor]
Metrics = dict[str, float]
Side = Literal["client", "server"]


class PrivacyInputs(Protocol):
    """What the run's privacy level gives the stages that privatise on the server
    (``fedpeft.engine.privacy_plan`` calibrates it before the pipeline is built)."""

    #: δ at which ε is reported
    delta: float | None
    #: z, calibrated from the budget (or given)
    noise_multiplier: float | None
    #: q, the Poisson client-sampling rate
    sample_rate: float
    #: where the run's noise comes from (secret under DP, :mod:`fedpeft.privacy.randomness`)
    streams: RandomStreams


@runtime_checkable
class PrivacyAccount(Protocol):
    """A stage that accounts the run's privacy on the server (user-level DP): what the privacy
    plan reads from it, without knowing the stage."""

    #: z charged to the accountant per round
    noise_multiplier: float
    #: the multiplier of the noise actually added to the update (≥ z under adaptive clipping)
    update_noise_multiplier: float

    def epsilon(self) -> float:
        """ε spent so far."""

    def exceeds_budget_next_round(self, epsilon: float) -> bool:
        """True when one more round would take ε past ``epsilon``."""

    def account_attempts(self, count: int) -> None:
        """Charge ``count`` round attempts that ran but are not in the state (a resume)."""


@dataclass(frozen=True)
class BuildEnv:
    """What a stage may read when the pipeline is built (the same on clients and server,
    except ``side``, the server-only ``privacy`` and the client's ``stages``)."""

    cfg: RunConfig
    strategy: type[FedPeftStrategy]
    side: Side
    #: the run's privacy level on the server (its δ, noise multiplier, sample rate and secret
    #: streams); None on clients
    privacy: PrivacyInputs | None = None
    #: the stages to build, as the server named them to a client (``client-stages`` in its
    #: messages); None: every stage :meth:`Stage.active` for ``cfg`` on ``side``
    stages: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ClientContext:
    """One client's round, as its stages see it."""

    client_id: int
    #: identity of the client's on-disk state (residuals, local parameters)
    key: str
    server_round: int
    round_rank: int | None
    broadcast: State
    state_dir: Path


@dataclass(frozen=True)
class ServerContext:
    """One server round, as its stages see it."""

    server_round: int
    round_rank: int | None
    global_state: State
    #: key -> shape of an honest upload this round, after every client stage (decoded); in
    #: :meth:`Stage.decode`, that of the replying client (what its payload must declare)
    upload_layout: Layout


class Stage:
    """One mechanism on the update path. Every hook defaults to "leave it unchanged"."""

    name: ClassVar[str]
    #: Position in the pipeline: client halves run in increasing order, ``decode`` in
    #: decreasing order, server halves in increasing order.
    order: ClassVar[int]
    #: True when :meth:`on_server` releases a combination of the cohort instead of the
    #: clients' own updates (central DP); strategies that need individual updates refuse it.
    combines_updates: ClassVar[bool] = False
    #: For a stage that combines updates: the setting that keeps them individual instead,
    #: offered when a strategy that needs them is refused (e.g. ``--dp sample``).
    keeps_updates_instead: ClassVar[str] = ""
    #: The client training procedure this stage needs (``fedpeft.engine.client``'s
    #: ``TRAINING_MODES``; a stage registers its own there), or None.
    training: ClassVar[str | None] = None

    #: Where the stage runs; a server-only stage (user-level DP) is not built on clients.
    sides: ClassVar[tuple[Side, ...]] = ("client", "server")

    @classmethod
    def active(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> bool:
        """Whether the run uses this stage (default: its name is listed in ``--stages``)."""
        return cls.name in cfg.stage_list

    @classmethod
    def switched_by_name(cls) -> bool:
        """True when ``--stages`` turns this stage on (it does not override :meth:`active`)."""
        return getattr(cls.active, "__func__", None) is Stage.active.__func__

    @classmethod
    def create(cls, env: BuildEnv) -> Stage:
        """This stage configured for the run (called only when :meth:`active`)."""
        return cls()

    @classmethod
    def refusal(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> str | None:
        """Why this stage cannot run with ``cfg`` and ``strategy`` (checked once, by
        :func:`refusals`), or None."""
        return None

    @classmethod
    def client_settings(cls, cfg: RunConfig) -> tuple[str, ...]:
        """The settings (``RunConfig`` field names) this stage's client half reads when it is
        active: :meth:`create` on a client and the client hooks. A client is sent only the
        settings its components declare (``fedpeft.engine.client_settings``); reading another
        one there raises."""
        return ()

    # -- client half around local training (fedpeft.engine.client.train_client) ----------
    def before_training(self, task: LocalTask, ctx: ClientContext) -> None:
        """Prepare the client's model once the broadcast is loaded, before it trains (a client
        without examples trains nothing and skips this and :meth:`after_training`)."""

    def after_step(self, task: LocalTask, ctx: ClientContext) -> Callable[[], None] | None:
        """What runs right after every local optimizer step (after the adapter's own hook), or
        None. Called once, after :meth:`before_training`."""
        return None

    def after_training(self, task: LocalTask, ctx: ClientContext) -> Metrics:
        """After the upload went through every :meth:`on_client`: keep what the client keeps,
        return reply metrics. May change the model (it is reloaded for every client)."""
        return {}

    def on_client(self, update: State, ctx: ClientContext) -> tuple[State, Metrics]:
        """Transform one client's update before it is sent."""
        return update, {}

    def decode(self, update: State, ctx: ServerContext) -> State:
        """On the server, undo what :meth:`on_client` did to the encoding (not the values)."""
        return update

    def client_layout(self, layout: Layout, client_id: int | None) -> Layout:
        """What :meth:`on_client` does to an honest upload's layout (after :meth:`decode`);
        ``client_id`` None: any client's (a layout shared by the whole cohort)."""
        return layout

    def on_server(self, updates: list[ClientUpdate], ctx: ServerContext) -> tuple[list[ClientUpdate], Metrics]:
        """Transform the round's accepted updates before aggregation."""
        return updates, {}

    def describe(self) -> str:
        return self.name

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"stage {self.name} keeps no state but the checkpoint has {sorted(state)}")


#: stage name -> class; the built-in stages register from :mod:`fedpeft.stages`
STAGES: Registry[type[Stage]] = Registry("stage", plugins="fedpeft.stages")


def active_stages(cfg: RunConfig, strategy: type[FedPeftStrategy], side: Side) -> list[type[Stage]]:
    """The stages a run with ``cfg`` and ``strategy`` uses on ``side``, by name."""
    return [stage for stage in (STAGES.get(n) for n in STAGES.names())
            if side in stage.sides and stage.active(cfg, strategy)]


def training_mode(stages: list[type[Stage]] | list[Stage]) -> str:
    """The client training mode ``stages`` ask for (``none``: plain local training)."""
    modes = {s.training for s in stages if s.training is not None}
    if len(modes) > 1:
        raise ValueError(f"stages ask for different client training modes: {sorted(modes)}")
    return modes.pop() if modes else "none"


@dataclass
class Pipeline:
    """The run's active stages in order (built the same way on every party)."""

    stages: list[Stage] = field(default_factory=list)

    @classmethod
    def build(cls, env: BuildEnv) -> Pipeline:
        if env.stages is None:
            chosen = active_stages(env.cfg, env.strategy, env.side)
        else:
            chosen = [STAGES.get(name) for name in env.stages]
            foreign = [s.name for s in chosen if env.side not in s.sides]
            if foreign:
                raise ValueError(f"stages {foreign} do not run on the {env.side}")
        built = [stage.create(env) for stage in chosen]
        return cls(sorted(built, key=lambda s: (s.order, s.name)))

    def find(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def training(self) -> str:
        """The client training mode the stages ask for (``none``: plain local training)."""
        return training_mode(self.stages)

    @property
    def combines_updates(self) -> bool:
        return any(s.combines_updates for s in self.stages)

    @property
    def privacy_account(self) -> PrivacyAccount | None:
        """The stage that accounts the run's privacy on the server, or None."""
        accounts = [s for s in self.stages if isinstance(s, PrivacyAccount)]
        if len(accounts) > 1:
            raise ValueError(f"more than one stage accounts privacy: {[s.name for s in accounts]}")
        return accounts[0] if accounts else None

    # -- client half around local training ------------------------------------------------
    def before_training(self, task: LocalTask, ctx: ClientContext) -> None:
        for stage in self.stages:
            stage.before_training(task, ctx)

    def step_hook(self, hook: StepHook | None, task: LocalTask, ctx: ClientContext) -> StepHook | None:
        """``hook`` (the adapter's) with every stage's :meth:`Stage.after_step` run after each
        optimizer step, following the hook's own callable, in stage order."""
        afters = [after for after in (s.after_step(task, ctx) for s in self.stages) if after is not None]
        if not afters:
            return hook

        def wrapped(step: int) -> Callable[[], None]:
            inner = hook(step) if hook is not None else None

            def run() -> None:
                if inner is not None:
                    inner()
                for after in afters:
                    after()
            return run
        return wrapped

    def after_training(self, task: LocalTask, ctx: ClientContext) -> Metrics:
        metrics: Metrics = {}
        for stage in self.stages:
            metrics.update(stage.after_training(task, ctx))
        return metrics

    def on_client(self, update: State, ctx: ClientContext) -> tuple[State, Metrics]:
        metrics: Metrics = {}
        for stage in self.stages:
            update, m = stage.on_client(update, ctx)
            metrics.update(m)
        return update, metrics

    def decode(self, update: State, ctx: ServerContext) -> State:
        for stage in reversed(self.stages):
            update = stage.decode(update, ctx)
        return update

    def client_layout(self, layout: Layout, client_id: int | None) -> Layout:
        for stage in self.stages:
            layout = stage.client_layout(layout, client_id)
        return layout

    def on_server(self, updates: list[ClientUpdate], ctx: ServerContext) -> tuple[list[ClientUpdate], Metrics]:
        metrics: Metrics = {}
        for stage in self.stages:
            updates, m = stage.on_server(updates, ctx)
            metrics.update(m)
        return updates, metrics

    def describe(self, strategy: str, server_opt: str = "none", downlink: str = "dense") -> str:
        """The whole update path in the order it runs (printed before round 1)."""
        trainers = [s.describe() for s in self.stages if s.training is not None]
        client = ["train" + (f" with {trainers[0]}" if trainers else "")]
        client += [s.describe() for s in self.stages if type(s).on_client is not Stage.on_client]
        server = ["decode " + s.describe() for s in reversed(self.stages) if type(s).decode is not Stage.decode]
        server.append("check")
        server += [s.describe() for s in self.stages if type(s).on_server is not Stage.on_server]
        server.append(f"aggregate ({strategy})")
        if server_opt != "none":
            server.append(f"server optimiser ({server_opt})")
        server.append(f"broadcast ({downlink})")
        return "client: " + " → ".join(client) + " | server: " + " → ".join(server)

    def state_dict(self) -> dict[str, Any]:
        states = {s.name: s.state_dict() for s in self.stages}
        return {name: state for name, state in states.items() if state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {s.name for s in self.stages}
        if unknown:
            raise ValueError(f"checkpoint holds state of stages this run does not use: {sorted(unknown)}")
        for stage in self.stages:
            stage.load_state_dict(dict(state.get(stage.name, {})))


def refusals(cfg: RunConfig, strategy: type[FedPeftStrategy]) -> str | None:
    """The first reason the run's stages and strategy cannot work together, or None: the one
    place where such refusals are checked (settings validation calls it)."""
    reason = strategy.refusal(cfg)
    if reason is not None:
        return reason
    for stage in (STAGES.get(n) for n in STAGES.names()):
        if not stage.active(cfg, strategy):
            continue
        reason = stage.refusal(cfg, strategy)
        if reason is not None:
            return reason
        if stage.combines_updates and strategy.needs_individual_updates:
            return (f"--strategy {cfg.strategy} needs every client's individual update, which the "
                    f"{stage.name} stage combines before aggregation; allowed: a strategy such as fedavg"
                    + (f", or {stage.keeps_updates_instead}" if stage.keeps_updates_instead else ""))
    return None


__all__ = ["STAGES", "BuildEnv", "ClientContext", "Layout", "Pipeline", "PrivacyAccount", "PrivacyInputs",
           "ServerContext", "Stage", "active_stages", "layout_of", "refusals", "training_mode"]

