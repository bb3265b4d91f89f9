"""fedpeft's own logging configuration: what prints is decided here, not by whichever library
configured the root logger first (issue 24, finding 2).

Opacus' ``opacus.utils.module_utils`` calls ``logging.basicConfig`` when it is imported, which
gives the root logger a stderr handler that prints every level it receives. Flower's ``flwr``
logger sits at DEBUG and propagates to the root, so once any DP code had imported Opacus every
Flower DEBUG record printed: among them the ClientApp's per-message timing line, ``fedpeft
message train client 17 round 3 ...``, i.e. the secret Poisson cohort of every round, in stderr.

:func:`install` is called where a fedpeft process starts work — :func:`fedpeft.simulation.simulate`
(``fedpeft simulate`` and ``fedpeft compare``), the deployment ServerApp and every ClientApp
message (Ray actors, deployed ClientApps; forked pool workers inherit it). It is idempotent:

- Flower's logger does not propagate: Flower's own console handler (INFO, or ``FLWR_LOG_LEVEL``)
  is the only place its records print.
- The root logger prints WARNING and above to stderr through fedpeft's handler. Being present, it
  turns any later ``basicConfig`` into a no-op; handlers an earlier ``basicConfig`` added (a plain
  ``StreamHandler`` on stderr/stdout) are removed. Handlers of any other type (a test runner's
  capture handlers, a file handler an embedding program set up) are left alone.

The per-client line itself is not logged under DP at all (:mod:`fedpeft.federation.message_timing`),
so raising Flower's level (``FLWR_LOG_LEVEL=DEBUG``) does not bring it back either.
"""

from __future__ import annotations

import logging
import sys

#: the format of fedpeft's root handler
FORMAT = "%(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """WARNING and above to the current ``sys.stderr`` (looked up on every record, so output
    redirection set up after :func:`install` — Flower's log streaming, pytest — still applies)."""

    fedpeft_owned = True

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter(FORMAT))

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns it
        pass


def _added_by_basic_config(handler: logging.Handler) -> bool:
    """A root handler of exactly the kind ``logging.basicConfig()`` creates for a console."""
    return (type(handler) is logging.StreamHandler
            and getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__))


def install() -> None:
    """Apply fedpeft's logging configuration to this process (idempotent, cheap)."""
    logging.getLogger("flwr").propagate = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        if _added_by_basic_config(handler):
            root.removeHandler(handler)
    if not any(getattr(h, "fedpeft_owned", False) for h in root.handlers):
        root.addHandler(_StderrHandler())


__all__ = ["FORMAT", "install"]
