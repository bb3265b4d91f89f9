"""Where a node keeps its per-client state (error-feedback residuals, FedSA-LoRA's local
``B``, sample-level DP accountants): one directory, files only for clients ever sampled."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig

#: the settings a client reads here (also a node policy's per-run directory)
SETTINGS: tuple[str, ...] = ("output",)


def client_state_dir(cfg: RunConfig, node_config: Mapping[str, Any]) -> Path:
    """Node config ``state-dir`` if set, else ``<output>/client_state``."""
    explicit = str(node_config.get("state-dir", "") or "")
    if explicit:
        return Path(explicit)
    return Path(cfg.output or "runs/default") / "client_state"
