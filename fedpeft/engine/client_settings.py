"""Clients receive only the settings their components declare (issue 27).

Every client-side component declares, next to the code that reads them, the ``RunConfig``
fields it reads:

==========================================  ===================================================
the local round                             :data:`fedpeft.engine.client.ROUND_SETTINGS`
its training mode (the stages ask for it)   :attr:`fedpeft.engine.client.TrainingMode.settings`
the workspace: its task and adapter         :func:`fedpeft.engine.workspace.workspace_settings`
                                            (``Task.client_settings``, ``Adapter.client_settings``)
each client stage active in the run         :meth:`fedpeft.pipeline.Stage.client_settings`
the ClientApp around the round              :data:`CLIENT_APP_SETTINGS` (threads, faults,
                                            where its state lives)
==========================================  ===================================================

:func:`declare` gathers them for a run; :meth:`fedpeft.config.RunConfig.to_client_flat` sends
exactly those (plus the names of the client stages, so a client needs no setting that only
switches a stage on), and the client reads them back as a
:class:`fedpeft.config.ClientConfig`, on which reading an undeclared setting raises. A
non-private run's message has no ``dp``, ``epsilon`` or ``sample-clip``; a ``--dp sample``
run's has what DP-SGD reads.
"""

from __future__ import annotations

from fedpeft.config import CLIENT_DECLARATIONS, ClientDeclaration, RunConfig
from fedpeft.engine import client_state, faults
from fedpeft.engine.client import ROUND_SETTINGS, TRAINING_MODES
from fedpeft.engine.workspace import workspace_settings
from fedpeft.pipeline import active_stages, training_mode
from fedpeft.strategy import STRATEGIES

#: what the ClientApp reads around a round: its torch threads (``fedpeft.threads.client_threads``),
#: the simulated faults, where its client state lives
CLIENT_APP_SETTINGS: tuple[str, ...] = ("cpus_per_client", *faults.SETTINGS, *client_state.SETTINGS)


@CLIENT_DECLARATIONS.register("run")
def declare(cfg: RunConfig) -> ClientDeclaration:
    """The settings the client-side components of the run ``cfg`` read, and its client stages."""
    stages = active_stages(cfg, STRATEGIES.get(cfg.strategy), "client")
    settings = {*ROUND_SETTINGS, *CLIENT_APP_SETTINGS, *workspace_settings(cfg),
                *TRAINING_MODES.get(training_mode(stages)).settings,
                *(name for stage in stages for name in stage.client_settings(cfg))}
    return ClientDeclaration(frozenset(settings), tuple(stage.name for stage in stages))


__all__ = ["CLIENT_APP_SETTINGS", "declare"]
