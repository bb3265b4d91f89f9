"""The DP publication policy between the round loop and the outside world (SPEC §3.4)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedpeft.engine.callbacks.base import Callback
from fedpeft.engine.run import RoundContext, RunContext
from fedpeft.privacy.publication import Publication

_log = logging.getLogger(__name__)


class PublishCallback(Callback):
    """Makes the published form of the plan and of every round (:class:`Publication`: under DP
    only what the guarantee covers, planned byte counts instead of the realised ones) and keeps
    it in ``run.state.published``; the full records stay in ``run.state.records`` for the
    checkpoint and the ``--diagnostics`` file. Reporters of the published view
    (:class:`ReportCallback`) must come after it.

    Logs are a publication too: only without DP does it warn about the clients that failed or
    were refused, naming them (``warn``: where such warnings go; the Flower layer passes
    Flower's log so they appear with the rest of the run's output).
    """

    def __init__(self, publication: Publication, warn: Callable[[str], None] = _log.warning) -> None:
        self.publication = publication
        self.warn = warn

    def on_start(self, run: RunContext) -> None:
        run.published_plan = self.publication.plan(run.plan)

    def on_round(self, ctx: RoundContext) -> None:
        result = ctx.result
        ctx.published = self.publication.round(ctx.record, dense_up=result.dense_up, dense_down=result.dense_down)
        ctx.run.state.published.append(ctx.published)
        if not self.publication.names_clients:  # under DP: who failed or was refused stays private
            return
        if result.clients_failed:
            self.warn(f"round {result.server_round}: {result.clients_failed} of {result.clients_sampled} "
                      "sampled clients failed or timed out; aggregating the "
                      f"{result.clients_sampled - result.clients_failed} replies")
        for client, why in result.rejections:
            self.warn(f"rejected update of client {client}: {why}")


__all__ = ["PublishCallback"]
