"""Reporter protocol: how the round loop tells the outside world what happened.

The loop knows nothing about terminals or files; the CLI plugs in a rich progress display
and a :class:`fedpeft.results.ResultsWriter`, a deployed ServerApp a log reporter, and either
of them the reporters the settings ask for (:func:`optional_reporters`: ``--tensorboard``).
Reporters see the published records only: under DP, what the mechanism covers.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedpeft.errors import UsageError
from fedpeft.results import FinalRecord, RoundRecord

if TYPE_CHECKING:
    from fedpeft.config import RunConfig

#: how to get the optional TensorBoard writer (pyproject's ``tensorboard`` extra)
TENSORBOARD_INSTALL = "pip install 'fedpeft[tensorboard]' (or pip install tensorboard)"


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


class TensorBoardReporter:
    """The numbers of rounds.csv as TensorBoard scalars (torch's SummaryWriter), one tag per
    rounds.csv column, the round as the step; a null (unpublished, not applicable) or
    non-finite value is skipped, as rounds.csv leaves it empty.

    A resumed run replays its published rounds to every reporter before round k+1; the writer
    opens with ``purge_step=1`` so TensorBoard hides the interrupted attempt's events and shows
    each round once.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def on_start(self, config: dict[str, Any], plan: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.log_dir), purge_step=1)

    def on_round(self, record: RoundRecord) -> None:
        for key, value in asdict(record).items():
            if key == "round" or isinstance(value, (bool, list, str)) or value is None:
                continue
            if math.isfinite(value):
                self._writer.add_scalar(key, value, global_step=record.round)
        self._writer.flush()

    def on_finish(self, final: FinalRecord) -> None:
        self._writer.close()


def check_tensorboard(log_dir: str | None) -> None:
    """A one-line UsageError when ``--tensorboard`` is given but the package is not installed
    (checked with the settings, before anything loads or runs)."""
    if log_dir and importlib.util.find_spec("tensorboard") is None:
        raise UsageError(f"--tensorboard {log_dir!r} needs the tensorboard package, which is not installed; "
                         f"install it with: {TENSORBOARD_INSTALL}")


def optional_reporters(cfg: RunConfig) -> list[Reporter]:
    """Reporters the settings ask for beside results.json: ``--tensorboard DIR`` logs to
    ``DIR/<name of the run directory>``, so runs sharing DIR show side by side."""
    if not cfg.tensorboard:
        return []
    name = Path(cfg.output).name if cfg.output else "run"
    return [TensorBoardReporter(Path(cfg.tensorboard) / name)]
