"""Heterogeneous client ranks (``--client-ranks 2,4,8``, FLoRA, SPEC §2.4): a rank-``r_i``
client uploads only ``A[:r_i]`` and ``B[:, :r_i]``.

On the client the stage holds the components beyond ``r_i`` at zero during training (it zeroes
them once the broadcast is loaded and again after every optimizer step,
:meth:`fedpeft.adapters.base.Adapter.limit_rank`), cuts them from the upload, and tells the
server the shapes to expect from that client. Server and clients derive
``r_i`` from the client's identity (:meth:`fedpeft.config.RunConfig.client_rank`), so
nothing extra is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedpeft.adapters.base import truncate_shape, truncate_state
from fedpeft.pipeline import STAGES, BuildEnv, ClientContext, Layout, Metrics, Stage, State

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.engine.client import LocalTask
    from fedpeft.strategy import FedPeftStrategy


@STAGES.register("rank-cap")
class RankCap(Stage):
    name = "rank-cap"
    order = 20

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @classmethod
    def active(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> bool:
        return bool(cfg.client_ranks)

    @classmethod
    def refusal(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> str | None:
        if not strategy.heterogeneous_ranks:
            from fedpeft.strategy import STRATEGIES

            allowed = ", ".join(n for n in STRATEGIES.names() if STRATEGIES.get(n).heterogeneous_ranks)
            return (f"--client-ranks needs a strategy that aggregates different ranks exactly, not "
                    f"--strategy {cfg.strategy}; allowed: {allowed}")
        return None

    @classmethod
    def create(cls, env: BuildEnv) -> RankCap:
        return cls(env.cfg)

    @classmethod
    def client_settings(cls, cfg: RunConfig) -> tuple[str, ...]:
        return ("client_ranks",)

    def after_step(self, task: LocalTask, ctx: ClientContext) -> Callable[[], None] | None:
        """This client is a rank-``r_i`` LoRA: zero the components beyond ``r_i`` now and after
        every optimizer step (so noise or weight decay cannot revive them)."""
        rank = self.cfg.client_rank(ctx.client_id)
        return None if rank is None else task.ws.adapter.limit_rank(task.ws.model, rank)

    def on_client(self, update: State, ctx: ClientContext) -> tuple[State, Metrics]:
        rank = self.cfg.client_rank(ctx.client_id)
        return (update if rank is None else truncate_state(update, rank)), {}

    def client_layout(self, layout: Layout, client_id: int | None) -> Layout:
        rank = None if client_id is None else self.cfg.client_rank(client_id)
        if rank is None:
            return layout
        return {k: truncate_shape(k, shape, rank) for k, shape in layout.items()}

    def describe(self) -> str:
        return f"truncate to client rank ({self.cfg.client_ranks})"
