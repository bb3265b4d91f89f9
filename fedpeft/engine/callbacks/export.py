"""The final model in the standard peft layout (``<output>/model``, :mod:`fedpeft.export`)."""

from __future__ import annotations

from pathlib import Path

from fedpeft.engine.callbacks.base import Callback
from fedpeft.engine.run import RunContext
from fedpeft.export import export_model


class ExportCallback(Callback):
    """Writes the released model (the iterate average under ``--ema``, the model that was
    evaluated) to ``out_dir`` once the last round has run, loadable with plain peft. Under DP
    it is the mechanism's output (post-processed), so exporting it costs no privacy."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)

    def on_finish(self, run: RunContext) -> None:
        export_model(run.ws, run.state.released_model(), run.cfg, self.out_dir)


__all__ = ["ExportCallback"]
