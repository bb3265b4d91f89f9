"""Tensors a strategy keeps on the clients never leave them (FedSA-LoRA's ``B``, SPEC §2.4).

A strategy declares them with a class attribute ``client_local(key) -> bool``
(:mod:`fedpeft.engine.local_params`). This stage drops them from the upload and from the
honest layout the server checks against, so byte counts, compression with error feedback
and user-level DP clipping, all later in the pipeline, only ever see the shared tensors.
(Loading and saving a client's own local tensors around training is the client's business,
:func:`fedpeft.engine.client.train_client`.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.engine.local_params import ClientLocal, client_local_of, shared_only
from fedpeft.pipeline import STAGES, BuildEnv, ClientContext, Layout, Metrics, Stage, State

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.strategy import FedPeftStrategy


@STAGES.register("client-local")
class KeepClientLocal(Stage):
    name = "client-local"
    order = 10

    def __init__(self, is_local: ClientLocal) -> None:
        self.is_local = is_local

    @classmethod
    def active(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> bool:
        return client_local_of(strategy) is not None

    @classmethod
    def create(cls, env: BuildEnv) -> KeepClientLocal:
        is_local = client_local_of(env.strategy)
        assert is_local is not None  # active() checked it
        return cls(is_local)

    def on_client(self, update: State, ctx: ClientContext) -> tuple[State, Metrics]:
        return shared_only(update, self.is_local), {}

    def client_layout(self, layout: Layout, client_id: int | None) -> Layout:
        return shared_only(layout, self.is_local)

    def describe(self) -> str:
        return "keep client-local tensors"
