"""``--dataset synthetic:<rows>``: a generated dataset for systems benchmarks only.

At 1M clients the embedded Rotten Tomatoes split (~11.5k training rows) leaves almost every
client empty; a systems benchmark that wants every client to train needs more rows of the
same shape. These rows are review-length strings of words drawn from the Rotten Tomatoes
vocabulary, and their labels are drawn independently of the text — so no model can beat
chance on them, and no accuracy measured on them can be mistaken for a result. Runs on it
carry a planner warning and the dataset name ``synthetic:<rows>`` in their config.
"""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from fedpeft.errors import UsageError

PREFIX = "synthetic:"
MAX_ROWS = 10_000_000
#: words per generated text (Rotten Tomatoes snippets are ~20 words)
WORDS = (8, 30)
WARNING = ("--dataset synthetic: generated rows with labels independent of the text, for systems "
           "benchmarks (time, memory, bytes); its accuracy is chance by construction and means nothing")


def is_synthetic(name: str) -> bool:
    return name.startswith(PREFIX)


def synthetic_rows(name: str) -> int:
    """The row count of ``synthetic:<rows>``, validated."""
    raw = name[len(PREFIX):]
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ROWS:
        raise UsageError(f"--dataset {name!r}: the row count must be an integer in [1, {MAX_ROWS:,}], "
                         "e.g. synthetic:1000000")
    return int(raw)


def synthetic(name: str, seed: int = 0) -> Dataset:
    """``rows`` generated texts with uniformly random binary labels."""
    from fedpeft.data.embedded import rotten_tomatoes

    rows = synthetic_rows(name)
    vocab = np.array(sorted({w for t in rotten_tomatoes()["text"][:2000] for w in t.lower().split() if w.isalpha()}))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(WORDS[0], WORDS[1] + 1, size=rows)
    words = vocab[rng.integers(0, len(vocab), size=int(lengths.sum()))]
    ends = np.cumsum(lengths)
    texts = [" ".join(words[e - n:e]) for e, n in zip(ends, lengths)]
    labels = rng.integers(0, 2, size=rows)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["synthetic-0", "synthetic-1"])})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)
