"""Resolve ``--dataset`` to a labeled train/test split.

``--dataset`` is an embedded name (``rotten-tomatoes``, ``bbc-news``), a local path
(a directory saved with ``save_to_disk``, or a csv/json/parquet file) or a Hugging Face hub
id (loaded with ``datasets.load_dataset``; needs network or a warm HF cache).
The held-out test split is fixed by the seed-independent ``split_seed`` so every run and
every strategy is evaluated on the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import ceil
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, disable_progress_bars, load_dataset, load_from_disk

from fedpeft.data.embedded import EMBEDDED
from fedpeft.data.synthetic import is_synthetic, synthetic
from fedpeft.errors import UsageError

disable_progress_bars()  # the CLI shows its own progress; datasets' bars are noise
SPLIT_SEED = 1234  # fixed: the test split must not move with --seed


@dataclass(frozen=True)
class LabeledSplits:
    train: Dataset
    test: Dataset
    num_labels: int
    label_names: list[str]


def _load_raw(name: str) -> Dataset | DatasetDict:
    if name in EMBEDDED:
        return EMBEDDED[name]()
    if is_synthetic(name):
        return synthetic(name)
    path = Path(name)
    if path.exists():
        if path.is_dir():
            return load_from_disk(str(path))
        kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise UsageError(f"--dataset {name!r}: unsupported file type; allowed: .csv .json .jsonl .parquet or a save_to_disk directory")
        return load_dataset(kind, data_files=str(path))
    try:
        return load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"--dataset {name!r} is not an embedded dataset ({', '.join(EMBEDDED)}), "
            f"an existing path, or a reachable Hugging Face hub id ({first})"
        ) from None


@lru_cache(maxsize=4)
def load_splits(name: str, text_column: str, label_column: str, test_fraction: float,
                max_test_examples: int) -> LabeledSplits:
    raw = _load_raw(name)
    if isinstance(raw, DatasetDict):
        train = raw["train"] if "train" in raw else raw[next(iter(raw))]
        test = raw["test"] if "test" in raw else None
    else:
        train, test = raw, None
    for col in (text_column, label_column):
        if col not in train.column_names:
            raise UsageError(f"--dataset {name!r} has no column {col!r}; columns: {', '.join(train.column_names)}")
    if not isinstance(train.features[label_column], ClassLabel):
        train = train.class_encode_column(label_column)
    if test is None:
        train, test = stratified_split(train, label_column, test_fraction)
    elif not isinstance(test.features[label_column], ClassLabel):
        test = test.cast_column(label_column, train.features[label_column])
    if len(test) > max_test_examples:
        test = test.shuffle(seed=SPLIT_SEED).select(range(max_test_examples))
    names = list(train.features[label_column].names)
    return LabeledSplits(train=train, test=test, num_labels=len(names), label_names=names)


def stratified_split(ds: Dataset, label_column: str, test_fraction: float) -> tuple[Dataset, Dataset]:
    """Exactly the rows of ``ds.train_test_split(test_size=test_fraction, seed=SPLIT_SEED,
    stratify_by_column=label_column)``, without its row-by-row read of the label column:
    datasets 4 turns the column into numpy one row at a time (1.2 of 1.5 s for 12.8k rows,
    paid by every process that builds a workspace); here it is one Arrow read. Falls back to
    datasets' own method if its index generator moves."""
    try:
        from datasets.arrow_dataset import stratified_shuffle_split_generate_indices  # noqa: F401
    except ImportError:  # pragma: no cover - another datasets version
        parts = ds.train_test_split(test_size=test_fraction, seed=SPLIT_SEED, stratify_by_column=label_column)
        return parts["train"], parts["test"]
    labels = np.asarray(ds.select_columns([label_column]).with_format("numpy")[:][label_column])
    train_idx, test_idx = stratified_indices(labels, test_fraction, SPLIT_SEED, what="test")
    return ds.select(train_idx), ds.select(test_idx)


def stratified_indices(labels: np.ndarray, fraction: float, seed: int,
                       what: str = "held-out") -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held_out)`` row indices: ``ceil(fraction · n)`` rows held out with the label
    proportions of the whole, chosen by ``seed`` (datasets' stratified index generator, the one
    ``Dataset.train_test_split`` uses, so the test split is the rows it would pick)."""
    from datasets.arrow_dataset import stratified_shuffle_split_generate_indices

    if not 0.0 < fraction < 1.0:
        raise UsageError(f"{what} fraction {fraction} must be in (0, 1)")
    n_out = ceil(fraction * len(labels))  # datasets' rounding
    try:
        kept, held_out = next(stratified_shuffle_split_generate_indices(
            np.asarray(labels), len(labels) - n_out, n_out, rng=np.random.default_rng(seed)))
    except Exception as exc:  # noqa: BLE001 - datasets' own wording for a too-rare class
        if str(exc) == "Minimum class count error":
            raise UsageError(f"a class has a single example: too few to split off a stratified {what} "
                             "set") from None
        raise
    return np.asarray(kept, dtype=np.int64), np.asarray(held_out, dtype=np.int64)


def load_all_rows(name: str, text_column: str, label_column: str) -> tuple[Dataset, list[str]]:
    """Every row of ``name`` (all its splits, unsplit) and its label names: a dataset to
    evaluate on as a whole, however small."""
    from datasets import concatenate_datasets

    raw = _load_raw(name)
    parts = list(raw.values()) if isinstance(raw, DatasetDict) else [raw]
    for col in (text_column, label_column):
        if col not in parts[0].column_names:
            raise UsageError(f"--dataset {name!r} has no column {col!r}; columns: {', '.join(parts[0].column_names)}")
    rows = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if not isinstance(rows.features[label_column], ClassLabel):
        rows = rows.class_encode_column(label_column)
    return rows, list(rows.features[label_column].names)
