"""Sample-level DP (``--dp sample``, SPEC §3.2): every client trains with Opacus DP-SGD.

This stage transforms no update: its mechanism is the training procedure itself
(``fedpeft.engine.client``'s ``sample`` training mode: per-example clipping, Gaussian
noise from the client's own secret, its persistent accountant). It sits in the pipeline so
that the order printed before round 1 shows where the privacy comes from, and so that the
client picks its training mode from the pipeline instead of from a privacy switch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.options import positive
from fedpeft.pipeline import STAGES, Stage

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.strategy import FedPeftStrategy


@STAGES.register("dp-sgd")
class DpSgd(Stage):
    name = "dp-sgd"
    order = 0
    options = (positive("sample_clip"),)
    training = "sample"

    def describe(self) -> str:
        return "DP-SGD (per-example clip + noise, Opacus)"

    @classmethod
    def active(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> bool:
        return cfg.dp == "sample"

    @classmethod
    def refusal(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> str | None:
        if cfg.probe_rounds:  # the DP-SGD training mode has no head-only phase (fedpeft.training.probe)
            return (f"--probe-rounds {cfg.probe_rounds} is not implemented with --dp sample (DP-SGD trains "
                    "every adapter tensor); allowed: --probe-rounds 0, or --dp user / none")
        if cfg.precision != "fp32":  # fedpeft.training.precision: per-example norms in bfloat16
            return (f"--precision {cfg.precision} with --dp sample would compute per-example gradients and "
                    "their norms in bfloat16, so the clip bound --sample-clip would hold only to ~3 digits "
                    "(a weaker guarantee than asked); allowed: --precision fp32")
        return None
