"""The round loop's hook interface (pfl-research's ``pfl/callback``): evaluation, checkpoints,
export, publication and reporting are one callback each, so the loop
(:func:`fedpeft.federation.server.run_federation`) is a short driver and every mechanism can be
tested on its own, without Flower.

The driver calls every callback's hooks in list order:

- ``on_start(run)`` once, after the run is built, before its first round;
- per round: ``before_round`` before anything of the round leaves the server, ``record_fields``
  once the round is aggregated (the fields a callback adds to the round's record), then
  ``on_round`` with the complete record;
- ``on_finish(run)`` once, after the last round (or a stop on the privacy budget).

A callback reads what an earlier one in the list wrote (the report callbacks read the published
records the publish callback made), so the list order is part of the contract:
:func:`fedpeft.engine.callbacks.default_callbacks` states it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedpeft.engine.run import RoundContext, RoundResult, RunContext, round_record


class Callback:
    """A no-op for every hook: a callback overrides the ones its mechanism needs."""

    def on_start(self, run: RunContext) -> None:
        """The run is built (restored state included, see ``run.resume``); no round has run."""

    def before_round(self, run: RunContext, server_round: int) -> None:
        """Round ``server_round`` is about to start; nothing of it has left the server yet."""

    def record_fields(self, run: RunContext, result: RoundResult) -> dict[str, Any]:
        """RoundRecord fields this callback measures for the aggregated round (evaluation)."""
        return {}

    def on_round(self, ctx: RoundContext) -> None:
        """The round is complete: ``ctx.record`` holds every field."""

    def on_finish(self, run: RunContext) -> None:
        """The last round has run (``run.wall_s`` is set); the run ends after this."""


def complete_round(run: RunContext, result: RoundResult, callbacks: Sequence[Callback]) -> RoundContext:
    """The callbacks' half of a round, once the round is aggregated: collect their record fields,
    build the round's full record (its wall time ends here, evaluation included), add it to the
    run's records and hand it to every ``on_round``."""
    fields: dict[str, Any] = {}
    for callback in callbacks:
        fields.update(callback.record_fields(run, result))
    ctx = RoundContext(run, result, round_record(run, result, fields))
    run.state.records.append(ctx.record)
    for callback in callbacks:
        callback.on_round(ctx)
    return ctx


__all__ = ["Callback", "complete_round"]
