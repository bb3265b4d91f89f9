"""``--backend`` name -> function that runs a resolved config (registered in
:mod:`fedpeft.simulation`, loaded by name the first time the registry is read, so settings
validation does not import the round loop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.engine.checkpoint import Checkpoint
    from fedpeft.federation.server import RunOutcome
    from fedpeft.reporting import Reporter

#: ``--backend auto`` (the default): see :func:`choose_backend`
AUTO = "auto"

Backend = Callable[["RunConfig", "list[Reporter]", bool, "Checkpoint | None"], "RunOutcome"]
BACKENDS: Registry[Backend] = Registry("backend", plugins="fedpeft.simulation")


#: ``--cpus-per-client`` at or above which a client runs multi-threaded: the forked pool cannot
#: (libgomp's OpenMP thread team does not survive ``fork``; a worker that opens a parallel
#: region after the driver used one hangs — measured: a 2-thread worker never finished)
POOL_MAX_CPUS_PER_CLIENT = 2


def choose_backend(ray_address: str | None, platform: str | None = None, cpus_per_client: float = 1) -> str:
    """What ``--backend auto`` runs: Ray when a cluster is named (``--ray-address`` /
    ``$RAY_ADDRESS``: client work spreads over its nodes) or clients are multi-threaded;
    otherwise, on Linux, the forked process pool (one machine: a third of Ray's memory, no Ray
    start-up, the fastest backend in the peer benchmark); elsewhere (fork is unsafe on macOS)
    Ray."""
    import sys

    if ray_address or cpus_per_client >= POOL_MAX_CPUS_PER_CLIENT:
        return "ray"
    return "processes" if (platform or sys.platform).startswith("linux") else "ray"
