"""Reporter fan-out: results.json, the terminal, TensorBoard, the diagnostics file
(:class:`fedpeft.reporting.Reporter`)."""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft.engine.callbacks.base import Callback
from fedpeft.engine.run import RoundContext, RunContext
from fedpeft.reporting import Reporter
from fedpeft.results import RoundRecord


class ReportCallback(Callback):
    """Tells ``reporters`` the plan, every round and the final record, in one view of the run:
    the published one (default; what :class:`PublishCallback`, which must come first, made of
    it) or, ``full=True``, the full records (the ``--diagnostics`` file, never a reporter of
    published results).

    A resumed run replays the rounds its checkpoint holds before round k+1, so every reporter
    sees the whole run (a results file rewritten from the start, TensorBoard purging the
    interrupted attempt's steps).
    """

    def __init__(self, reporters: Sequence[Reporter], full: bool = False) -> None:
        self.reporters = list(reporters)
        self.full = full

    def on_start(self, run: RunContext) -> None:
        plan = run.plan if self.full else run.published_plan
        if plan is None:
            raise ValueError("a report of the published view needs a PublishCallback before it")
        for r in self.reporters:
            r.on_start(run.cfg.to_dict(), plan)
        for record in self._resumed(run):
            for r in self.reporters:
                r.on_round(record)

    def _resumed(self, run: RunContext) -> list[RoundRecord]:
        """The checkpoint's rounds in this view (a checkpoint without published records
        predates the publication policy: it published its records as they were)."""
        if run.resume is None:
            return []
        if self.full or run.resume.published is None:
            return list(run.resume.records)
        return list(run.resume.published)

    def on_round(self, ctx: RoundContext) -> None:
        record = ctx.record if self.full else ctx.published
        if record is None:
            raise ValueError("a report of the published view needs a PublishCallback before it")
        for r in self.reporters:
            r.on_round(record)

    def on_finish(self, run: RunContext) -> None:
        final = run.final(published=not self.full)
        for r in self.reporters:
            r.on_finish(final)


__all__ = ["ReportCallback"]
