"""Heterogeneous client ranks (``--client-ranks 2,4,8``, FLoRA, SPEC §2.4): a rank-``r_i``
client uploads only ``A[:r_i]`` and ``B[:, :r_i]``.

Training already holds the components beyond ``r_i`` at zero
(:meth:`fedpeft.adapters.base.Adapter.limit_rank`); this stage cuts them from the upload,
and tells the server the shapes to expect from that client. Server and clients derive
``r_i`` from the client's identity (:meth:`fedpeft.config.RunConfig.client_rank`), so
nothing extra is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.adapters.base import truncate_shape, truncate_state
from fedpeft.pipeline import STAGES, BuildEnv, ClientContext, Layout, Metrics, Stage, State

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
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
