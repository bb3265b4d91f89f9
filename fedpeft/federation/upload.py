"""The client upload path: plain state, or a compressed delta with error feedback.

With ``--compression none`` the trained tensors travel as they are. Otherwise the client
sends ``C(τ + e)`` with ``τ = upload − broadcast`` (SPEC §2.3) as one byte payload, and keeps
the residual ``e`` in a per-client file (compact state: only clients ever sampled have one).
The server side (:func:`decode_upload`) rebuilds ``global + decode(payload)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedpeft.adapters.base import State
from fedpeft.compression import DiskResidualStore, ErrorFeedback, build_codec, decode_payload, wire
from fedpeft.config import RunConfig
from fedpeft.federation.records import from_record, to_record
from fedpeft.updates import apply_update, client_delta


def client_state_dir(cfg: RunConfig, node_config: Mapping[str, Any]) -> Path:
    """Where this node keeps per-client state: node config ``state-dir``, else the run dir."""
    explicit = str(node_config.get("state-dir", "") or "")
    if explicit:
        return Path(explicit)
    return Path(cfg.output or "runs/default") / "client_state"


def codec_for(cfg: RunConfig):  # noqa: ANN201 - Codec
    options = {"density": cfg.density} if cfg.compression == "stc" else {"density": cfg.density, "gamma": cfg.gamma}
    return build_codec(cfg.compression, **options)


def encode_upload(cfg: RunConfig, client_id: int, broadcast: State, upload: State,
                  state_dir: Path) -> ArrayRecord:
    if cfg.compression == "none" or not upload:
        return to_record(upload)
    feedback = ErrorFeedback(codec_for(cfg), DiskResidualStore(state_dir / "residuals"))
    payload, _sent = feedback.encode(str(client_id), client_delta(broadcast, upload))
    return wire.to_record(payload)


def decode_upload(record: ArrayRecord, global_state: State) -> State:
    """A client's upload as a state (decompressing ``global + Δ̂`` when compressed)."""
    if wire.is_compressed(record):
        return apply_update(global_state, decode_payload(wire.from_record(record)))
    return from_record(record)
