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

A new stage is one file in :mod:`fedpeft.stages` (or any package imported before the run)
registering a subclass in :data:`STAGES`; it switches itself on from the run config in
:meth:`Stage.active` (default: when its name is listed in ``--stages``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from fedpeft.layout import Layout, layout_of
from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.strategy import ClientUpdate, FedPeftStrategy

State = dict[str, torch.Tensor]
Metrics = dict[str, float]
Side = Literal["client", "server"]


@dataclass(frozen=True)
class BuildEnv:
    """What a stage may read when the pipeline is built (the same on clients and server,
    except ``side`` and the server-only ``privacy``)."""

    cfg: RunConfig
    strategy: type[FedPeftStrategy]
    side: Side
    #: the run's privacy level on the server (``fedpeft.engine.privacy_plan``): its δ,
    #: noise multiplier, sample rate and secret streams; None on clients
    privacy: Any = None


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
    #: ``TRAINING_MODES``), or None.
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


@dataclass
class Pipeline:
    """The run's active stages in order (built the same way on every party)."""

    stages: list[Stage] = field(default_factory=list)

    @classmethod
    def build(cls, env: BuildEnv) -> Pipeline:
        built = [stage.create(env) for stage in (STAGES.get(n) for n in STAGES.names())
                 if env.side in stage.sides and stage.active(env.cfg, env.strategy)]
        return cls(sorted(built, key=lambda s: (s.order, s.name)))

    def find(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def training(self) -> str:
        """The client training mode the stages ask for (``none``: plain local training)."""
        modes = {s.training for s in self.stages if s.training is not None}
        if len(modes) > 1:
            raise ValueError(f"stages ask for different client training modes: {sorted(modes)}")
        return modes.pop() if modes else "none"

    @property
    def combines_updates(self) -> bool:
        return any(s.combines_updates for s in self.stages)

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


__all__ = ["STAGES", "BuildEnv", "ClientContext", "Layout", "Pipeline", "ServerContext", "Stage",
           "layout_of", "refusals"]

