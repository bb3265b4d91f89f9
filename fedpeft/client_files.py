"""Per-client files: one file per client ever sampled, named by the client's key.

Three stores keep such files (error-feedback residuals, FedSA-LoRA's local parameters,
sample-level DP accountants); they share this one rule for turning a key into a path, so a
key can never climb out of its directory or hide as a dotfile.
"""

from __future__ import annotations

import re
from pathlib import Path

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def client_file(directory: Path, key: object, suffix: str) -> Path:
    """``directory / f"{key}{suffix}"``; ValueError for a key unusable as a file name."""
    name = str(key)
    if not _SAFE_KEY.match(name):
        raise ValueError(f"client key {name!r} is not usable as a file name")
    return directory / f"{name}{suffix}"
