"""``--backend`` name -> function that runs a resolved config (registered in
:mod:`fedpeft.simulation`, loaded by name the first time the registry is read, so settings
validation does not import the round loop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.federation.checkpoint import Checkpoint
    from fedpeft.federation.server import RunOutcome
    from fedpeft.reporting import Reporter

Backend = Callable[["RunConfig", "list[Reporter]", bool, "Checkpoint | None"], "RunOutcome"]
BACKENDS: Registry[Backend] = Registry("backend", plugins="fedpeft.simulation")
