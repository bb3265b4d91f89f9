"""Per-process cache of everything heavy: backbone + adapter, tokenised data, partitions.

A Ray actor (or a SuperNode's ClientApp process) builds this once and reuses it for every
client it hosts: the base model exists once per worker and only adapter/head tensors are
swapped in and out per client. Never one model copy per client.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpeft.adapters import ADAPTERS, Adapter, AdapterSpec, State, build_adapter
from fedpeft.config import RunConfig
from fedpeft.data.features import FeatureSplit, cache_key, cached_features, split_features
from fedpeft.data.hidden_states import HiddenSplit
from fedpeft.data.holdout import Holdout, RowSubset, carve_validation
from fedpeft.data.partition import Partitions
from fedpeft.data.sources import LabeledSplits
from fedpeft.disk_cache import cached_arrays
from fedpeft.data.tokenized import TokenizedSplit
from fedpeft.model.feature_head import FeatureClassifier, head_dropout
from fedpeft.model.frozen_bottom import first_trained_layer, layer_inputs, matches_full_model, use_cached_bottom
from fedpeft.model.loading import resolve_model_path
from fedpeft.model.packing import enable_packing
from fedpeft.tasks import Task, get_task
from fedpeft.tasks.classification import text_and_labels  # noqa: F401 - its old home

#: the settings the workspace reads itself, beside its task's and its adapter's
#: (:func:`workspace_settings`)
_OWN_SETTINGS = ("task", "adapter", "seed", "validation_fraction", "bottom_cache")
#: what determines a frozen part's output besides the layer (the disk caches' keys), read with
#: the encoder speed-ups of a task that has them (:func:`_data_identity`)
_DATA_IDENTITY = ("model", "pooling", "dataset", "text_column", "label_column", "max_length", "test_fraction",
                  "max_test_examples")


@dataclass
class Workspace:
    adapter: Adapter
    model: nn.Module
    pad_id: int
    splits: LabeledSplits
    #: token ids; the cached head features when the adapter trains nothing below the head; the
    #: cached input of the lowest trained layer when only the top layers train
    train: TokenizedSplit | FeatureSplit | HiddenSplit
    test: TokenizedSplit | FeatureSplit | HiddenSplit
    initial_state: State
    #: pristine copies of the adapted layers' frozen weights (``...base_layer.weight``):
    #: FLoRA folds updates into them, and every run starts from these
    frozen_base: State
    _partitions: dict[tuple[str, int, float], Partitions]
    #: seconds per build phase (data, tokenise, model[, features]): what a message that
    #: builds the workspace pays, logged by the ClientApp (federation/message_timing.py)
    build_timings: dict[str, float] = field(default_factory=dict)
    #: 1 for the first workspace this process built, 2 for the next, ...
    build_number: int = 0
    #: non-private training batches are packed (no padding tokens; fedpeft.model.packing)
    packed: bool = False
    #: encoder layers below this one run once per example, not per visit (0: none cached;
    #: fedpeft.model.frozen_bottom)
    cached_layers: int = 0
    #: what is learned (``--task``): its batches and evaluation (fedpeft.tasks)
    task: Task = field(default_factory=lambda: get_task("classification"))
    #: train rows held out for validation (``--validation-fraction``; fedpeft.data.holdout):
    #: no partition contains them. None: every train row goes to the clients
    holdout: Holdout | None = None

    @property
    def train_examples(self) -> int:
        """Training rows the clients' partitions are drawn from (the train split minus the
        validation rows)."""
        return len(self.train) if self.holdout is None else len(self.holdout.train_rows)

    @property
    def validation(self) -> RowSubset | None:
        """The validation rows as a split the server evaluates on, or None."""
        return None if self.holdout is None else RowSubset(self.train, self.holdout.validation_rows)

    def eval_split(self, name: str) -> Any:  # noqa: ANN401 - a split of the task's kind
        """The split central evaluation scores: ``"test"`` or ``"validation"``."""
        if name == "test":
            return self.test
        if name == "validation" and self.holdout is not None:
            return self.validation
        raise ValueError(f"no {name!r} split to evaluate (--validation-fraction is "
                         f"{'set' if self.holdout is not None else '0'})")

    def partitions(self, scheme: str, num_partitions: int, dirichlet_alpha: float, seed: int) -> Partitions:
        key = (scheme, num_partitions, dirichlet_alpha)
        if key not in self._partitions:
            self._partitions[key] = Partitions(self.splits.train, scheme, num_partitions, "label", dirichlet_alpha,
                                               seed, rows=None if self.holdout is None else self.holdout.train_rows)
        return self._partitions[key]


_lock = threading.Lock()
_cache: dict[tuple, Workspace] = {}
_builds = 0


def workspace_settings(cfg: RunConfig) -> tuple[str, ...]:
    """The settings that change what the workspace holds: its own, its task's and its adapter's
    (what a client is sent for it, :mod:`fedpeft.engine.client_settings`)."""
    task = get_task(cfg.task)
    return tuple(sorted({*_OWN_SETTINGS, *task.client_settings, *ADAPTERS.get(cfg.adapter).client_settings,
                         *(_DATA_IDENTITY if task.encoder_speedups else ())}))


def workspace_key(cfg: RunConfig) -> tuple:
    return tuple((name, getattr(cfg, name)) for name in workspace_settings(cfg))


def adapter_spec(cfg: RunConfig) -> AdapterSpec:
    return AdapterSpec(rank=cfg.rank, alpha=cfg.alpha, min_rank=cfg.min_rank,
                       target_modules=tuple(cfg.target_module_list), seed=cfg.seed,
                       layers=tuple(cfg.lora_layer_list), task_type=get_task(cfg.task).peft_task_type)


def get_workspace(cfg: RunConfig) -> Workspace:
    """The cached workspace for ``cfg`` (built on first use; one entry per process)."""
    global _builds
    key = workspace_key(cfg)
    with _lock:
        ws = _cache.get(key)
        if ws is None:
            _cache.clear()  # a new run in the same worker: drop the previous backbone
            ws = _build(cfg)
            _builds += 1
            ws.build_number = _builds
            _cache[key] = ws
        return ws


def builds_in_process() -> int:
    """How many workspaces this process has built (a warm process builds one per run)."""
    return _builds


def _build(cfg: RunConfig) -> Workspace:
    timings: dict[str, float] = {}
    task = get_task(cfg.task)  # what is learned: base model, data, batches, evaluation
    t0 = time.perf_counter()
    splits = task.load_splits(cfg)
    t1 = time.perf_counter()
    timings["data"] = t1 - t0
    train, test, pad_id = task.tokenize(cfg, splits)
    t2 = time.perf_counter()
    timings["tokenise"] = t2 - t1
    adapter = build_adapter(cfg.adapter, adapter_spec(cfg))
    model = adapter.inject(task.base_model(cfg, splits))
    model.eval()
    t3 = time.perf_counter()
    timings["model"] = t3 - t2
    packed, cached = False, 0
    # a task without the encoder speed-ups runs its own batches every visit (settings
    # validation refused the flags that ask for them)
    if task.encoder_speedups and adapter.frozen_encoder:
        model, train, test = _frozen_features(cfg, model, train, test, int(pad_id))
        timings["features"] = time.perf_counter() - t3
    elif task.encoder_speedups and len(train):
        first = first_trained_layer(model) if cfg.bottom_cache else 0
        if first > 0:
            bottom = _frozen_bottom(cfg, model, train, test, int(pad_id), first)
            if bottom is not None:
                train, test, cached = *bottom, first
            timings["bottom-cache"] = time.perf_counter() - t3
        t4 = time.perf_counter()
        packed = enable_packing(model, train, np.arange(min(PACKING_PROBE, len(train))), int(pad_id))
        timings["packing-check"] = time.perf_counter() - t4
    return Workspace(adapter=adapter, model=model, pad_id=int(pad_id), splits=splits, train=train,
                     test=test, initial_state=adapter.trainable_state(model),
                     frozen_base=adapted_base_weights(model), _partitions={}, build_timings=timings,
                     packed=packed, cached_layers=cached, task=task,
                     # before partitioning, from the labels every representation of train keeps
                     holdout=carve_validation(train.labels, cfg.validation_fraction) if cfg.validation_fraction else None)


#: training rows the packed forward is checked on against the padded one
PACKING_PROBE = 4


FEATURE_BATCH = 64


def _frozen_features(cfg: RunConfig, model: nn.Module, train: TokenizedSplit,
                     test: TokenizedSplit, pad_id: int) -> tuple[nn.Module, FeatureSplit, FeatureSplit]:
    """Replace encoder + token splits by the head on cached features (computed once per
    machine, :mod:`fedpeft.data.features`); the encoder is dropped from this process."""
    key = cache_key({**_data_identity(cfg), "train_n": len(train), "test_n": len(test)})

    arrays = cached_features(key, lambda: {"train": split_features(model, train, pad_id, FEATURE_BATCH),
                                           "test": split_features(model, test, pad_id, FEATURE_BATCH)})
    head = FeatureClassifier(model.classifier, head_dropout(model))
    head.eval()
    return (head, FeatureSplit(arrays["train"], train.labels), FeatureSplit(arrays["test"], test.labels))


def _frozen_bottom(cfg: RunConfig, model: nn.Module, train: TokenizedSplit, test: TokenizedSplit, pad_id: int,
                   first: int) -> tuple[HiddenSplit, HiddenSplit] | None:
    """The input of encoder layer ``first`` for every train and test example, computed once per
    machine (memory-mapped from the disk cache), and ``model`` switched to run only layers
    ``first..`` on it — or None, model unchanged, when the cached path does not reproduce the
    full forward on a few rows (:func:`fedpeft.model.frozen_bottom.matches_full_model`)."""
    key = cache_key({**_data_identity(cfg), "train_n": len(train), "test_n": len(test), "layer": first})

    def compute() -> dict[str, np.ndarray]:
        parts = {name: layer_inputs(model, split, first, pad_id, FEATURE_BATCH)
                 for name, split in (("train", train), ("test", test))}
        return {f"{name}_{k}": v for name, arrays in parts.items() for k, v in arrays.items()}

    arrays = cached_arrays("hidden", key, compute, mmap=True)
    hidden = {name: HiddenSplit(arrays[f"{name}_states"], arrays[f"{name}_offsets"], split.labels)
              for name, split in (("train", train), ("test", test))}
    use_cached_bottom(model, first)
    if not matches_full_model(model, train, hidden["train"], np.arange(min(PACKING_PROBE, len(train))), pad_id):
        use_cached_bottom(model, 0)
        return None
    return hidden["train"], hidden["test"]


def _data_identity(cfg: RunConfig) -> dict[str, object]:
    """What determines a frozen part's output besides the layer (the cache keys' common part)."""
    return {"model": cfg.model, "model_path": resolve_model_path(cfg.model), "pooling": cfg.pooling,
            "dataset": cfg.dataset, "text_column": cfg.text_column, "label_column": cfg.label_column,
            "max_length": cfg.max_length, "test_fraction": cfg.test_fraction,
            "max_test_examples": cfg.max_test_examples}  # _DATA_IDENTITY


def adapted_base_weights(model: nn.Module) -> State:
    """Copies of the frozen weight of every LoRA-wrapped layer (peft's ``base_layer``)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.endswith(".base_layer.weight") and not p.requires_grad}


def frozen_fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every frozen parameter (tests use it to prove the base never changes)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
