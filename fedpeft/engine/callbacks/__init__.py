"""The round loop's callbacks, one mechanism per file (pfl-research's ``pfl/callback``):

- ``evaluate``: central evaluation of the released model (``--eval-every``, validation rows);
- ``export``: the final model in the standard peft layout (``<output>/model``);
- ``publish``: the DP publication policy (what reporters and logs may see);
- ``report``: reporter fan-out (results.json, terminal, TensorBoard, ``--diagnostics``);
- ``checkpoint``: save every K rounds, the DP attempt ledger, restore on resume.

:func:`default_callbacks` puts them in the order the driver needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.engine.callbacks.base import Callback, complete_round
from fedpeft.engine.callbacks.checkpoint import CheckpointCallback
from fedpeft.engine.callbacks.evaluate import EvaluateCallback, Evaluator
from fedpeft.engine.callbacks.export import ExportCallback
from fedpeft.engine.callbacks.publish import PublishCallback
from fedpeft.engine.callbacks.report import ReportCallback
from fedpeft.export import MODEL_DIR
from fedpeft.privacy.publication import DiagnosticsWriter, Publication

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.reporting import Reporter

def default_callbacks(cfg: RunConfig, reporters: Sequence[Reporter], private: bool, test: Evaluator,
                      validation: Evaluator | None = None,
                      warn: Callable[[str], None] | None = None) -> list[Callback]:
    """A run's callbacks in the order they must run: evaluation fills the record before anything
    reads it; the model is exported before the reporters finish (a results file with a final
    record has its model beside it); the publish callback makes the published view before the
    reporters read it; the checkpoint comes last (a round is saved once it has been reported,
    and the privacy key is deleted only after everything else finished)."""
    output = Path(cfg.output) if cfg.output else None
    # the full records go only to the --diagnostics file, whose name says they are not covered
    diagnostics = [DiagnosticsWriter(output, private)] if cfg.diagnostics and output is not None else []
    publication = Publication(private, cfg.cohort)
    return [
        EvaluateCallback(test, validation, cfg.eval_every),
        *([ExportCallback(output / MODEL_DIR)] if output is not None else []),
        PublishCallback(publication, warn) if warn is not None else PublishCallback(publication),
        ReportCallback(reporters),
        ReportCallback(diagnostics, full=True),
        CheckpointCallback(output, cfg.checkpoint_every),
    ]


__all__ = ["Callback", "CheckpointCallback", "EvaluateCallback", "Evaluator", "ExportCallback",
           "PublishCallback", "ReportCallback", "complete_round", "default_callbacks"]
