"""Which Ray cluster a simulation joins (``--ray-address`` / ``$RAY_ADDRESS``), checked before
anything starts: Ray itself retries an unreachable head for minutes without saying why."""

from __future__ import annotations

import os
import socket

from fedpeft.config import RunConfig
from fedpeft.errors import UsageError


def ray_address(cfg: RunConfig) -> str | None:
    """The Ray cluster to join (``--ray-address``, else ``$RAY_ADDRESS``), or None: start one."""
    return cfg.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One-line :class:`UsageError` unless a Ray head accepts TCP connections at ``address``
    (``host:port``; ``auto`` and ``ray://`` client addresses are left to Ray)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r} is invalid; allowed: host:port of a Ray head "
                         "(as printed by `ray start --head`), auto, or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"--ray-address {address!r}: no Ray head answers there ({exc.strerror or exc}); "
                         "start one with `ray start --head` or drop the flag") from None
