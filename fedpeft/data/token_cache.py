"""Token ids computed once per machine: tokenised splits on disk, keyed by their inputs.

Every process that builds a workspace — the simulation driver, each Ray actor, each
SuperNode's ClientApp worker (and, with Flower's default executor, every ClientApp message) —
tokenises the whole training split: 11,527 reviews, ≈ 2 s of CPU on this machine. The ids
depend only on the texts, the tokenizer and ``max_length``, so the key hashes exactly those:
the texts themselves (so any dataset, column or split change misses), the tokenizer's files
(name, size, mtime of every file in its directory), its class, the transformers version and
``max_length``. Stored as one flat int32 array plus row offsets under
``$FEDPEFT_CACHE_DIR/tokens`` (:mod:`fedpeft.disk_cache`: locked, written atomically).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.data.tokenized import TokenizedSplit, tokenize
from fedpeft.disk_cache import cached_arrays

#: bump when tokenisation itself changes (invalidates old entries)
TOKEN_CACHE_VERSION = 1


def tokenizer_identity(tokenizer: Any, model_path: str) -> dict[str, Any]:
    """What distinguishes one tokenizer from another without tokenising anything."""
    import transformers

    ident: dict[str, Any] = {"class": type(tokenizer).__name__, "transformers": transformers.__version__,
                             "path": str(model_path)}
    directory = Path(model_path)
    if directory.is_dir():
        ident["files"] = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns]
                                for p in directory.iterdir() if p.is_file())
    else:  # a hub id: the name and what the loaded tokenizer reports
        ident.update({"name_or_path": getattr(tokenizer, "name_or_path", None),
                      "vocab_size": getattr(tokenizer, "vocab_size", None)})
    return ident


def token_key(texts: Sequence[str], identity: dict[str, Any], max_length: int) -> str:
    h = hashlib.sha256(json.dumps({"tokenizer": identity, "max_length": int(max_length),
                                   "version": TOKEN_CACHE_VERSION}, sort_keys=True).encode())
    h.update(len(texts).to_bytes(8, "little"))
    for text in texts:
        raw = text.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()[:32]


def cached_tokenize(texts: Sequence[str], labels: Sequence[int], tokenizer: Any, max_length: int,
                    identity: dict[str, Any]) -> TokenizedSplit:
    """:func:`fedpeft.data.tokenized.tokenize`, computed once per machine for these inputs."""
    texts = list(texts)

    def compute() -> dict[str, np.ndarray]:
        split = tokenize(texts, labels, tokenizer, max_length)
        lengths = split.lengths
        flat = np.concatenate(split.input_ids) if len(split) else np.zeros(0, dtype=np.int32)
        return {"ids": flat.astype(np.int32, copy=False),
                "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}

    arrays = cached_arrays("tokens", token_key(texts, identity, max_length), compute)
    offsets = arrays["offsets"]
    ids = [arrays["ids"][offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    return TokenizedSplit(input_ids=ids, labels=np.asarray(labels, dtype=np.int64))
