"""Error-feedback compression of the upload (``--compression compeft|stc``, SPEC §2.3).

The client sends ``C(τ + e)`` with ``τ = upload − broadcast`` as one byte payload (a single
``uint8`` tensor under :data:`fedpeft.compression.wire.WIRE_KEY`) and keeps the residual
``e`` in a per-client file (compact state: only clients ever sampled have one). The server
half rebuilds ``global + decode(payload)`` before any check or later stage sees it, so
user-level DP clips exactly what was received (the compressed value, SPEC §2.3/§3.1).

It runs last on the client: whatever earlier stages removed (client-local tensors, rank
components) is never encoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedpeft.compression import CODECS, Codec, DiskResidualStore, ErrorFeedback, codec_for, decode_payload, wire
from fedpeft.pipeline import STAGES, BuildEnv, ClientContext, Metrics, ServerContext, Stage, State
from fedpeft.updates import apply_update, client_delta

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.strategy import FedPeftStrategy

RESIDUALS_DIR = "residuals"


@STAGES.register("compression")
class ErrorFeedbackCompression(Stage):
    name = "compression"
    order = 50

    def __init__(self, codec: Codec, label: str) -> None:
        self.codec = codec
        self.label = label

    @classmethod
    def active(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> bool:
        return cfg.compression != "none"

    @classmethod
    def client_settings(cls, cfg: RunConfig) -> tuple[str, ...]:
        return ("compression", *(o.name for o in CODECS.get(cfg.compression).options))

    @classmethod
    def create(cls, env: BuildEnv) -> ErrorFeedbackCompression:
        cfg = env.cfg
        options = ", ".join(f"{o.name} {getattr(cfg, o.name):g}" for o in CODECS.get(cfg.compression).options)
        return cls(codec_for(cfg), f"{cfg.compression}{f' ({options})' if options else ''} with error feedback")

    def on_client(self, update: State, ctx: ClientContext) -> tuple[State, Metrics]:
        if not update:
            return update, {}
        feedback = ErrorFeedback(self.codec, DiskResidualStore(ctx.state_dir / RESIDUALS_DIR))
        payload, _sent = feedback.encode(ctx.key, client_delta(ctx.broadcast, update))
        return {wire.WIRE_KEY: torch.from_numpy(wire.to_wire(payload))}, {}

    def decode(self, update: State, ctx: ServerContext) -> State:
        """``global + decode(payload)``; the payload's declared layout must be the sender's
        honest one (``ctx.upload_layout``), checked before anything is allocated."""
        if wire.WIRE_KEY not in update:
            return update
        payload = wire.from_wire(update[wire.WIRE_KEY])
        return apply_update(ctx.global_state, decode_payload(payload, expected=ctx.upload_layout))

    def describe(self) -> str:
        return self.label
