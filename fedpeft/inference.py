"""Use a run's exported model (``<run>/model/``, :mod:`fedpeft.export`): classify texts
(``fedpeft predict``) and re-evaluate it on a dataset (``fedpeft evaluate``).

The model is loaded the way its README tells anyone to — transformers + peft, no fedpeft
model code — so both commands also check that the published model is the one the run
measured. Only the dataset handling (``--dataset`` names, the run's test split) is fedpeft's.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.atomic import atomic_write_text
from fedpeft.errors import UsageError
from fedpeft.export import HEAD_LAYOUTS, MODEL_DIR, HeadLayout, loadable_base
from fedpeft.model.loading import quiet_transformers

ADAPTER_CONFIG = "adapter_config.json"
RESULTS = "results.json"
#: where ``fedpeft evaluate`` keeps its numbers, one entry per dataset and split
EVALUATIONS = "evaluations.json"
BATCH = 32
SPLITS = ("test", "all")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    layout: HeadLayout
    labels: list[str]

    @torch.inference_mode()
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), labels)`` logits in input order (batched by length, which pads least)."""
        lengths = [len(ids) for ids in self.tokenizer(list(texts), truncation=True)["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = torch.empty(len(texts), len(self.labels))
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            enc = self.tokenizer([texts[i] for i in rows], truncation=True, padding=True, return_tensors="pt")
            out[rows] = self.layout.logits(self.model(**enc).logits, enc["attention_mask"]).float()
        return out


def model_dir_of(path: str) -> Path:
    """The exported model of a run directory (or that model directory itself)."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"run directory {path!r} does not exist; allowed: a fedpeft run directory "
                         f"(with {MODEL_DIR}/) or its {MODEL_DIR}/ directory")
    for candidate in (p, p / MODEL_DIR):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise UsageError(f"{path!r} has no exported model ({MODEL_DIR}/{ADAPTER_CONFIG}); runs write it when "
                     "they finish (a run from before this fedpeft version has none)")


def load_model(model_dir: Path) -> LoadedModel:
    """The exported model on its base, as in the export's README (eval mode)."""
    quiet_transformers()
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_dir)
        base = PeftConfig.from_pretrained(str(model_dir)).base_model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"{str(model_dir)!r} is not a loadable exported model ({_first_line(exc)})") from None
    pooling = getattr(config, "classifier_pooling", None)
    if pooling not in HEAD_LAYOUTS:
        raise UsageError(f"{str(model_dir)!r}: config.json has classifier_pooling {pooling!r}; "
                         f"allowed: {', '.join(HEAD_LAYOUTS.names())} (not a fedpeft export?)")
    layout = HEAD_LAYOUTS.get(pooling)
    try:
        # the published name of an embedded base loads from the wheel's copy (no network)
        model = PeftModel.from_pretrained(layout.auto().from_pretrained(loadable_base(base), config=config),
                                          str(model_dir))
    except (OSError, ValueError) as exc:
        raise UsageError(f"the base model {base!r} named in {model_dir / ADAPTER_CONFIG} with this adapter "
                         f"cannot be loaded ({_first_line(exc)})") from None
    model.eval()
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return LoadedModel(model, tokenizer, layout, labels)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# -- predict -------------------------------------------------------------------------------
def predict_run(run: str, texts: Sequence[str], file: str | None, column: str | None) -> list[Prediction]:
    """``fedpeft predict``: the texts given, then those of ``column`` in ``file``, classified."""
    model_dir = model_dir_of(run)
    if column is not None and file is None:
        raise UsageError(f"--column {column!r} needs --file (the csv/jsonl file it is a column of)")
    texts = checked_texts([*texts, *(read_texts(file, column or "text") if file is not None else [])])
    return predict(load_model(model_dir), texts)


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    probability: float


def predict(model: LoadedModel, texts: Sequence[str]) -> list[Prediction]:
    """The most likely label of each text and its softmax probability."""
    probs = model.logits(texts).softmax(-1)
    best = probs.argmax(-1)
    return [Prediction(t, model.labels[int(i)], float(p[i])) for t, i, p in zip(texts, best, probs)]


def checked_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` unchanged, or a UsageError naming the first empty one."""
    if not texts:
        raise UsageError("no text to classify; give texts as arguments or --file F --column C")
    for i, text in enumerate(texts, 1):
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"text {i} is empty ({text!r}); every text must contain non-blank characters")
    return list(texts)


def read_texts(file: str, column: str) -> list[str]:
    """Column ``column`` of a csv (header row) or jsonl/json (one object per line / a list) file."""
    path = Path(file)
    if not path.is_file():
        raise UsageError(f"--file {file!r} does not exist")
    readers = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".json": _json_rows}
    if path.suffix not in readers:
        raise UsageError(f"--file {file!r}: unsupported file type {path.suffix!r}; allowed: {', '.join(readers)}")
    try:
        columns, rows = readers[path.suffix](path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--file {file!r} is not valid {path.suffix[1:]} ({str(exc).splitlines()[0]})") from None
    if column not in columns:
        raise UsageError(f"--column {column!r} is not a column of {file!r}; columns: {', '.join(columns) or 'none'}")
    return [row.get(column) for row in rows]  # type: ignore[misc] - checked_texts rejects non-strings


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _jsonl_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return _columns(rows), rows


def _json_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError("expected a list of objects")
    return _columns(rows), rows


def _columns(rows: list[Any]) -> list[str]:
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError("every record must be an object")
    return list(dict.fromkeys(k for r in rows for k in r))


# -- evaluate ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    dataset: str
    split: str
    examples: int
    accuracy: float
    loss: float


def evaluate_run(run: str, dataset: str | None, split: str, text_column: str | None,
                 label_column: str | None) -> tuple[Evaluation, Path]:
    """``fedpeft evaluate``: the exported model on ``split`` of ``dataset`` (default: the run's
    test split, rebuilt as the run built it); returns the result and the run directory."""
    model_dir = model_dir_of(run)
    run_dir = Path(run) if (Path(run) / RESULTS).is_file() else model_dir.parent
    config = run_config(run_dir)
    texts, labels = evaluation_examples(config, label_names(model_dir), dataset, split, text_column, label_column)
    return evaluate(load_model(model_dir), texts, labels, dataset or config["dataset"], split), run_dir


def label_names(model_dir: Path) -> list[str]:
    """The exported model's label names in id order (``config.json`` ``id2label``)."""
    id2label = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)]


def run_config(run_dir: Path) -> dict[str, Any]:
    """The saved settings of a run (``results.json`` ``config``)."""
    results = run_dir / RESULTS
    if not results.is_file():
        raise UsageError(f"{str(run_dir)!r} is not a fedpeft run directory (no {RESULTS})")
    try:
        return dict(json.loads(results.read_text(encoding="utf-8"))["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{str(results)!r} is unreadable ({exc})") from None


def evaluation_examples(config: dict[str, Any], labels: list[str], dataset: str | None, split: str,
                        text_column: str | None, label_column: str | None) -> tuple[list[str], list[int]]:
    """Texts and model label ids of ``split`` of ``dataset`` (default: the run's dataset), built
    like the run built its splits (same columns, test fraction, test cap and split seed)."""
    from fedpeft.data.sources import load_all_rows, load_splits

    if split not in SPLITS:
        raise UsageError(f"--split {split!r} is not allowed; allowed: {', '.join(SPLITS)}")
    name = dataset or config["dataset"]
    text_col = text_column or config["text_column"]
    label_col = label_column or config["label_column"]
    if split == "all":
        rows, names = load_all_rows(name, text_col, label_col)
    else:
        try:
            splits = load_splits(name, text_col, label_col, float(config["test_fraction"]),
                                 int(config["max_test_examples"]))
        except UsageError:
            raise
        except ValueError as exc:  # e.g. too few rows per label for a stratified test split
            raise UsageError(f"--dataset {name!r}: no test split can be built ({str(exc).splitlines()[0]}); "
                             "evaluate every row with --split all") from None
        rows, names = splits.test, splits.label_names
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise UsageError(f"--dataset {name!r} has labels {', '.join(unknown)} that the model does not know; "
                         f"the model's labels: {', '.join(labels)}")
    to_model = [labels.index(n) for n in names]
    return list(rows[text_col]), [to_model[i] for i in rows[label_col]]


def evaluate(model: LoadedModel, texts: Sequence[str], labels: Sequence[int], dataset: str, split: str) -> Evaluation:
    """Accuracy and mean cross-entropy, as the run's central evaluation computes them."""
    if not texts:
        raise UsageError(f"--dataset {dataset!r} has no {split} examples")
    logits = model.logits(texts)
    target = torch.tensor(list(labels))
    loss = float(torch.nn.functional.cross_entropy(logits, target))
    accuracy = float((logits.argmax(-1) == target).float().mean())
    return Evaluation(dataset, split, len(texts), accuracy, loss)


def save_evaluation(run_dir: Path, result: Evaluation) -> Path:
    """Add (or replace) ``result`` in ``<run>/evaluations.json``, keyed by dataset and split."""
    path = run_dir / EVALUATIONS
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        saved = {}
    saved[f"{result.dataset} [{result.split}]"] = asdict(result)
    atomic_write_text(path, json.dumps(saved, indent=2) + "\n", fsync=False)
    return path


__all__ = ["EVALUATIONS", "Evaluation", "LoadedModel", "Prediction", "checked_texts", "evaluate",
           "evaluate_run", "evaluation_examples", "load_model", "model_dir_of", "predict", "predict_run",
           "read_texts", "run_config", "save_evaluation"]
