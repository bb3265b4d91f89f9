"""The task interface: what a run learns, and everything about it that is not the federation.

A task (``--task``) owns the four places where "what is being learned" shows: the frozen base
model it builds (a sentence classifier, a causal LM), the data it reads and how rows become
token ids, how a batch is collated (its labels: class ids, or next tokens with the prompt
masked), and how the server's evaluation scores the global model (accuracy, or held-out loss
and perplexity). Adapters, strategies, the update pipeline, DP and compression act on the
trainable tensors only and never ask which task runs. Tasks are registered by name in
:data:`TASKS` (one module per task, as adapters and strategies are).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedpeft.errors import UsageError
from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.data.sources import LabeledSplits
    from fedpeft.export import Export
    from fedpeft.engine.workspace import Workspace
    from fedpeft.training.evaluate import EvalResult

#: ``--target-modules auto``: the LoRA targets peft uses by default for the model's type
AUTO_TARGETS = "auto"

#: ``--task`` name -> Task class
TASKS: Registry[type[Task]] = Registry("task")
DEFAULT_TASK = "classification"


@dataclass(frozen=True)
class Metric:
    """A held-out score a task is judged by, declared by the task so that ``fedpeft compare``
    tabulates, pairs and plots it without asking which task ran."""

    #: column stem in comparison.csv (``<name>_mean``, ``<name>_ci_low``, ...) and plot file stem
    name: str
    #: short title in the comparison table ("accuracy", "eval loss")
    title: str
    #: axis label of the plots
    label: str
    #: key of the per-round value in results.json's ``rounds``
    round_key: str
    #: key of the run's value in results.json's ``final``; None: the last round that reported it
    final_key: str | None
    higher_is_better: bool
    #: format of the value (and its interval) in the table
    spec: str = ".4f"

    def final(self, run: dict[str, Any]) -> float | None:
        """The run's value of this metric (None when the run does not report it)."""
        if self.final_key is not None:
            return run["final"].get(self.final_key)
        return next((r[self.round_key] for r in reversed(run["rounds"]) if r.get(self.round_key) is not None), None)

    def value(self, run: dict[str, Any], last: int = 1) -> float | None:
        """The run's final value, or with ``last`` > 1 the mean of its last ``last`` reported
        evaluations (fewer if it has fewer): on label-skewed clients with small cohorts the last
        round alone is pulled towards the last cohort's labels."""
        if last <= 1:
            return self.final(run)
        values = [r[self.round_key] for r in run["rounds"] if r.get(self.round_key) is not None][-last:]
        return sum(values) / len(values) if values else None


ACCURACY = Metric("accuracy", "accuracy", "test accuracy", "eval_accuracy", "accuracy", higher_is_better=True)


class Task(ABC):
    """One kind of learning problem: its base model, data, batches and evaluation."""

    name: ClassVar[str]
    #: what the task is judged by, the headline first (compare pairs it against the baseline)
    metrics: ClassVar[tuple[Metric, ...]] = (ACCURACY,)
    #: peft ``task_type`` of the injected LoRA (decides peft's model wrapper and which head
    #: modules it trains beside the adapter)
    peft_task_type: ClassVar[str]
    #: settings whose default differs for this task (``RunConfig`` field -> value); applied
    #: below the config file and CLI flags (:func:`fedpeft.settings.resolve`)
    defaults: ClassVar[dict[str, Any]] = {}
    #: the planner's measured candidates (``fedpeft.planning.forecast.CANDIDATES``) are for this task
    planned: ClassVar[bool] = False
    #: the planner's time estimate (``fedpeft.planning.forecast.CostModel``) was measured on this task's
    #: default model; else a plan states that it has none instead of quoting a wrong one
    cost_measured: ClassVar[bool] = False
    #: the planner's warning when the DP noise is predicted to swamp the signal: what that run
    #: looks like and the levers this task has (None: a classifier's, ``fedpeft.planning.forecast.SWAMPED``)
    swamped: ClassVar[str | None] = None
    #: the encoder speed-ups apply: cached head features (``--adapter head``), the cached
    #: frozen bottom (``--train-top-k``) and packed training batches
    encoder_speedups: ClassVar[bool] = False
    #: :meth:`evaluate` scores a row subset of the train split (``--validation-fraction``,
    #: fedpeft.data.holdout.RowSubset: labels, lengths and ``collate`` of its rows)
    validates_on_train_rows: ClassVar[bool] = False
    #: the settings :meth:`load_splits`, :meth:`tokenize` and :meth:`base_model` read: what a
    #: client is sent for the task (``fedpeft.engine.client_settings``)
    client_settings: ClassVar[tuple[str, ...]] = ()

    def model_type(self, model: str) -> str:
        """transformers ``model_type`` of ``--model``, read from its config only."""
        from fedpeft.model.loading import resolve_model_path

        return config_model_type(model, resolve_model_path(model))

    def complete(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with ``--target-modules auto`` replaced by peft's default LoRA targets for the
        model's type (q_proj,v_proj for Llama/Qwen/Mistral, c_attn for GPT-2's Conv1D,
        query,value for BERT), so results.json and the export name the modules adapted."""
        if cfg.target_modules != AUTO_TARGETS:
            return cfg
        return dataclasses.replace(cfg, target_modules=default_target_modules(cfg.model, self.model_type(cfg.model)))

    def refusal(self, cfg: RunConfig) -> str | None:
        """One line saying which setting this task cannot run with and what is allowed, or None."""
        return None

    @abstractmethod
    def load_splits(self, cfg: RunConfig) -> LabeledSplits:
        """The train/test rows. Their ``label`` column is what partitioners split by (the class;
        for chat data, the topic)."""

    @abstractmethod
    def tokenize(self, cfg: RunConfig, splits: LabeledSplits) -> tuple[Any, Any, int]:
        """``(train, test, pad_id)``: the splits as token ids (one array per row)."""

    @abstractmethod
    def base_model(self, cfg: RunConfig, splits: LabeledSplits) -> nn.Module:
        """The frozen base (every weight ``requires_grad=False``, eval mode); the adapter is
        injected afterwards."""

    @abstractmethod
    def collate(self, split: Any, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:  # noqa: ANN401
        """A training batch of ``rows``: model inputs plus ``labels`` (first dimension = rows),
        whose forward returns the loss the client minimises."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: Any, pad_id: int,  # noqa: ANN401
                 shard: tuple[int, int] = (0, 1)) -> EvalResult:
        """The model scored on shard ``shard = (i, k)`` of ``split`` (every k-th batch from i;
        the shards' results combine with :meth:`EvalResult.combine` into the whole)."""

    @abstractmethod
    def build_export(self, ws: Workspace, global_state: dict[str, torch.Tensor], cfg: RunConfig) -> Export:
        """The final global model as a standard peft folder (:mod:`fedpeft.export`); raises
        :class:`fedpeft.export.ExportUnsupported` when no stock class reproduces it."""

    def round_metrics(self, ev: EvalResult | None) -> dict[str, float | None]:
        """The ``RoundRecord`` evaluation fields of ``ev`` (all None when not evaluated)."""
        return {"eval_loss": ev.loss if ev else None, "eval_accuracy": ev.accuracy if ev else None,
                "eval_perplexity": None}


def config_model_type(model: str, path: str) -> str:
    """``model_type`` in the config at ``path`` (``--model`` named in the error)."""
    from transformers import AutoConfig

    try:
        return str(AutoConfig.from_pretrained(path).model_type)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {model!r} could not be loaded ({str(exc).splitlines()[0]})") from None


def default_target_modules(model: str, model_type: str) -> str:
    """peft's own default LoRA targets for ``model_type``
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``), comma-separated."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    targets = PEFT_TARGETS.get(model_type)
    if not targets:
        raise UsageError(f"--target-modules auto: peft has no default LoRA targets for --model {model!r} (model type "
                         f"{model_type!r}); allowed: --target-modules naming its attention projections, e.g. q_proj,v_proj")
    return ",".join(targets)


__all__ = ["ACCURACY", "AUTO_TARGETS", "DEFAULT_TASK", "TASKS", "Metric", "Task", "config_model_type",
           "default_target_modules"]
