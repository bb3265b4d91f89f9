"""Sentence classification (the default task): a pretrained encoder with a fresh linear head,
cross-entropy on class ids, evaluated by accuracy and mean loss on the held-out split."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedpeft.tasks.base import TASKS, Task

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.data.sources import LabeledSplits
    from fedpeft.export import Export
    from fedpeft.engine.workspace import Workspace
    from fedpeft.training.evaluate import EvalResult

#: examples per central-evaluation batch
EVAL_BATCH = 64


def text_and_labels(split, text_column: str) -> tuple[list[str], list[int]]:  # noqa: ANN001
    """The split's texts and labels as lists, read in one Arrow slice: iterating a
    ``datasets`` column yields row by row (0.59 s for the 11.5k train rows vs 0.04 s)."""
    rows = split.select_columns([text_column, "label"])[:]
    return rows[text_column], rows["label"]


@TASKS.register("classification")
class Classification(Task):
    name = "classification"
    peft_task_type = "SEQ_CLS"
    planned = True
    cost_measured = True
    encoder_speedups = True
    client_settings = ("model", "pooling", "dataset", "text_column", "label_column", "max_length", "test_fraction",
                       "max_test_examples", "seed")
    validates_on_train_rows = True

    def load_splits(self, cfg: RunConfig) -> LabeledSplits:
        from fedpeft.data.sources import LabeledSplits, load_splits

        splits = load_splits(cfg.dataset, cfg.text_column, cfg.label_column, cfg.test_fraction,
                             cfg.max_test_examples)
        if cfg.label_column != "label":
            splits = LabeledSplits(train=splits.train.rename_column(cfg.label_column, "label"),
                                   test=splits.test.rename_column(cfg.label_column, "label"),
                                   num_labels=splits.num_labels, label_names=splits.label_names)
        return splits

    def tokenize(self, cfg: RunConfig, splits: LabeledSplits) -> tuple[Any, Any, int]:
        from fedpeft.data.token_cache import cached_tokenize, tokenizer_identity
        from fedpeft.model.loading import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(cfg.model)
        ident = tokenizer_identity(tokenizer, resolve_model_path(cfg.model))
        train = cached_tokenize(*text_and_labels(splits.train, cfg.text_column), tokenizer, cfg.max_length, ident)
        test = cached_tokenize(*text_and_labels(splits.test, cfg.text_column), tokenizer, cfg.max_length, ident)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return train, test, int(pad_id)

    def base_model(self, cfg: RunConfig, splits: LabeledSplits) -> nn.Module:
        from fedpeft.model.loading import load_classifier

        return load_classifier(cfg.model, splits.num_labels, cfg.seed, cfg.pooling)

    def collate(self, split: Any, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:  # noqa: ANN401
        from fedpeft.data.tokenized import collate

        return collate(split, rows, pad_id)

    def evaluate(self, model: nn.Module, split: Any, pad_id: int,  # noqa: ANN401
                 shard: tuple[int, int] = (0, 1)) -> EvalResult:
        from fedpeft.data.tokenized import eval_batches
        from fedpeft.training.evaluate import evaluate

        return evaluate(model, eval_batches(split, EVAL_BATCH, pad_id, shard))

    def build_export(self, ws: Workspace, global_state: dict[str, torch.Tensor], cfg: RunConfig) -> Export:
        from fedpeft.export import build_export

        return build_export(ws, global_state, cfg)
