"""Central evaluation of the model a run releases (``--eval-every``, ``--validation-fraction``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedpeft.adapters.base import State
from fedpeft.engine.callbacks.base import Callback
from fedpeft.engine.run import RoundResult, RunContext
from fedpeft.training.evaluate import EvalResult

#: scores a model state on one split (in this process, or sharded over the simulation's workers)
Evaluator = Callable[[State], EvalResult]


class EvaluateCallback(Callback):
    """Scores the released model (the iterate average under ``--ema``, else the global model)
    on the held-out test split and, with ``--validation-fraction``, on the validation rows:
    the same model at the same rounds, so the two curves can be compared.

    Central evaluation costs more than a small cohort's training, so ``--eval-every k`` scores
    only every k-th round; the last round is always scored (it gives the final accuracy).
    Unscored rounds keep null evaluation fields.
    """

    def __init__(self, test: Evaluator, validation: Evaluator | None = None, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"evaluate every {every} rounds; need at least 1")
        self.test = test
        self.validation = validation
        self.every = every

    def due(self, server_round: int, rounds: int) -> bool:
        """Is ``server_round`` of a ``rounds``-round run scored?"""
        return server_round % self.every == 0 or server_round == rounds

    def record_fields(self, run: RunContext, result: RoundResult) -> dict[str, Any]:
        ev = val = None
        if self.due(result.server_round, run.cfg.rounds):
            model = run.state.released_model()
            ev = self.test(model)
            val = self.validation(model) if self.validation is not None else None
        return {**run.ws.task.round_metrics(ev),  # the task names its scores (perplexity, ...)
                "validation_loss": val.loss if val else None,
                "validation_accuracy": val.accuracy if val else None}


__all__ = ["EvaluateCallback", "Evaluator"]
