"""Reporter protocol: how the round loop tells the outside world what happened.

The loop knows nothing about terminals or files; the CLI plugs in a rich progress display
and a :class:`fedpeft.results.ResultsWriter`, a deployed ServerApp a log reporter.
"""

from __future__ import annotations

from logging import INFO
from typing import Any, Protocol

from fedpeft.results import FinalRecord, RoundRecord


class Reporter(Protocol):
    def on_start(self, config: dict[str, Any], plan: dict[str, Any]) -> None: ...

    def on_round(self, record: RoundRecord) -> None: ...

    def on_finish(self, final: FinalRecord) -> None: ...


class LogReporter:
    """Plain log lines (used by the deployed ServerApp)."""

    def on_start(self, config: dict[str, Any], plan: dict[str, Any]) -> None:
        from flwr.common import log

        log(INFO, "fedpeft plan: %s", plan)

    def on_round(self, record: RoundRecord) -> None:
        from flwr.common import log

        log(INFO, "fedpeft round %d: acc=%s loss=%s clients=%s up=%dB agg_err=%s",
            record.round, record.eval_accuracy, record.eval_loss, record.clients_sampled,
            record.bytes_up, record.aggregation_error)

    def on_finish(self, final: FinalRecord) -> None:
        from flwr.common import log

        log(INFO, "fedpeft final: %s", final)
