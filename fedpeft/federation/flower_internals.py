"""The simulation's uses of Flower internals, in one module, behind a version guard.

fedpeft talks to Flower through its public API (``flwr.app``, ``flwr.serverapp``,
``flwr.clientapp``) except where the simulation stands in for Flower's runtime: its in-memory
grids (``virtual_grid.py``, ``local_grid.py``, ``process_pool.py``) do what a SuperLink and a
SuperNode would, and :class:`~fedpeft.federation.virtual_grid.RayGrid` runs messages on
Flower's Ray backend. For that it needs, with no compatibility promise from Flower:

- ``flwr.supercore.run.Run``: the run a Grid reports (``Grid.run``);
- ``flwr.supercore.task_identity.TaskIdentity``: the process' task identity, which Flower's
  runtimes set and ``Message()`` reads;
- the private fields of a message's metadata (its id, run and creation time), which Flower's
  link state fills in when a message is stored;
- ``flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend``: the Ray actor pool of
  ``flwr[simulation]``;
- ``flwr.common.logger.FLOWER_LOGGER``: the logger Ray's per-actor chatter goes to.

Why a refusal, not a warning, on an untested Flower: these internals can change without
failing loudly. A renamed metadata field would be set as a new attribute while Flower reads
another one, a moved identity would leave ``Message()`` stamping the wrong run, and the
simulation would go on producing results. Every grid therefore checks the installed version
when it is built (:func:`require_tested_flower`) and refuses any other with one line naming
both versions. The logger is the exception: the worst a change there can do is print Ray's
chatter, so :func:`flower_logger` falls back to the logger's name and needs no guard. A
deployed run (``fedpeft.server_app``, the ClientApp) uses the public API only and is not
refused; the warm ClientApp worker has its own guard (``fedpeft/deploy/clientapp_worker.py``).

Moving to a new Flower release: re-read the five uses above in that release, run
``tests/federation`` with ``FEDPEFT_UNTESTED_FLOWER=1`` (which turns the refusal into a
warning), then update :data:`TESTED_FLOWER` together with the pin in ``pyproject.toml``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fedpeft.errors import UsageError

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.supercore.run import Run

#: the Flower release these uses were written and tested against (``flwr[simulation]==`` in pyproject.toml)
TESTED_FLOWER = "1.42.0"
#: set to 1 to run the simulation on another Flower release anyway (with a warning)
OVERRIDE_ENV = "FEDPEFT_UNTESTED_FLOWER"


class UntestedFlower(UsageError):
    """The installed Flower is not the release the simulation's uses of its internals were tested on."""


@lru_cache(maxsize=1)
def installed_flower() -> str:
    """The installed flwr version ("none" when Flower is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr")
    except PackageNotFoundError:
        return "none"


def flower_version_problem(found: str | None = None) -> str | None:
    """One line saying why the simulation must not run on Flower ``found`` (default: the
    installed one), or None for the tested release."""
    found = installed_flower() if found is None else found
    if found == TESTED_FLOWER:
        return None
    return (f"fedpeft's simulation was tested with flwr {TESTED_FLOWER} only, found flwr {found} (its grids "
            f"use Flower internals that change between releases); install flwr[simulation]=={TESTED_FLOWER}, "
            f"or set {OVERRIDE_ENV}=1 to run anyway")


def require_tested_flower(found: str | None = None) -> None:
    """Raise :class:`UntestedFlower` on an untested Flower, unless :data:`OVERRIDE_ENV` is set
    (then warn once per process and go on)."""
    problem = flower_version_problem(found)
    if problem is None:
        return
    if os.environ.get(OVERRIDE_ENV, "") not in ("", "0"):
        warnings.warn(problem, RuntimeWarning, stacklevel=2)
        return
    raise UntestedFlower(problem)


def new_run(run_id: int) -> Run:
    """The run a simulated grid serves, and this process' task identity set to it (what a
    Flower runtime sets before any ``Message()`` is built: run ``run_id``, node 0, task ``run_id``)."""
    require_tested_flower()
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = run_id
    return Run.create_empty(run_id)


def stamp_message(message: Message, message_id: str, run_id: int | None = None,
                  created_at: float | None = None) -> None:
    """Set what Flower's link state sets when it stores ``message``: its id and, for a message
    the grid sends, its run and creation time (now, when not given)."""
    fields: dict[str, Any] = {"_message_id": message_id}
    if run_id is not None:
        fields.update(_run_id=run_id, _created_at=time.time() if created_at is None else created_at)
    message.metadata.__dict__.update(fields)


def ray_backend(config: dict[str, Any]) -> Any:  # noqa: ANN401 - Flower's RayBackend
    """Flower's Ray backend (the actor pool of ``flwr[simulation]``) for ``config``
    (``client_resources``, ``init_args``)."""
    require_tested_flower()
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    return RayBackend(config)


def flower_logger() -> logging.Logger:
    """Flower's logger (Ray's per-actor chatter goes to it); by its name if Flower moved it."""
    try:
        from flwr.common.logger import FLOWER_LOGGER
    except ImportError:
        return logging.getLogger("flwr")
    return FLOWER_LOGGER


__all__ = ["OVERRIDE_ENV", "TESTED_FLOWER", "UntestedFlower", "flower_logger", "flower_version_problem",
           "installed_flower", "new_run", "ray_backend", "require_tested_flower", "stamp_message"]
