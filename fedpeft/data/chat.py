"""Prompt/response data for instruction tuning (``--task causal-lm``).

``--dataset`` is ``chatterbot`` (embedded, :func:`fedpeft.data.embedded.chatterbot`), or a
local csv/json/jsonl/parquet file or ``save_to_disk`` directory with ``prompt`` and
``response`` columns (an optional ``topic`` column groups rows for the partitioners: with
``--partition dirichlet`` clients get skewed topic mixes). A dataset with a ``test`` split keeps
it; otherwise a fixed share (``--test-fraction``, stratified by topic, seed-independent) is held
out, as for classification.

Each pair becomes one chat (user, assistant) formatted with the model's own chat template.
The prompt part is the template applied to the user turn with the generation prompt (what
``fedpeft generate`` feeds the model); the answer part is the rest of the formatted chat (the
answer and the template's end-of-turn tokens). Both are tokenised separately and concatenated,
so the prompt tokens a model is trained on are exactly the ones it later generates from. Labels
are the answer tokens; prompt and padding positions are -100 (no loss), so the loss is only on
what the assistant says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Value

from fedpeft.data.sources import SPLIT_SEED, LabeledSplits, stratified_split
from fedpeft.errors import UsageError

PROMPT, RESPONSE, TOPIC = "prompt", "response", "topic"
#: label id of a position that carries no loss (transformers' and PyTorch's ignore_index)
IGNORE = -100


@dataclass
class ChatSplit:
    """Tokenised chats: ``input_ids[i]`` = prompt tokens then answer tokens; the first
    ``prompt_lengths[i]`` of them carry no loss. ``labels`` are the rows' topics (partitioners
    and per-topic statistics), not targets."""

    input_ids: list[np.ndarray]
    prompt_lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    @property
    def answer_tokens(self) -> int:
        return int((self.lengths - self.prompt_lengths).sum())


def chat_rows(raw: Dataset, name: str) -> Dataset:
    """``raw`` as ``prompt``/``response``/``label`` rows (label = the topic, or one group)."""
    missing = [c for c in (PROMPT, RESPONSE) if c not in raw.column_names]
    if missing:
        raise UsageError(f"--dataset {name!r} has no column {missing[0]!r}; --task causal-lm needs prompt and "
                         f"response columns; columns: {', '.join(raw.column_names)}")
    if "label" in raw.column_names and isinstance(raw.features["label"], ClassLabel):
        return raw.select_columns([PROMPT, RESPONSE, "label"])
    if TOPIC in raw.column_names:
        rows = raw.select_columns([PROMPT, RESPONSE, TOPIC]).cast_column(TOPIC, Value("string"))
        return rows.class_encode_column(TOPIC).rename_column(TOPIC, "label")
    rows = raw.select_columns([PROMPT, RESPONSE])
    return rows.add_column("label", [0] * len(rows)).cast_column("label", ClassLabel(names=["all"]))


@lru_cache(maxsize=4)
def load_chat_splits(name: str, test_fraction: float, max_test_examples: int) -> LabeledSplits:
    """Train/test prompt/response rows of ``--dataset name`` (label = topic)."""
    from fedpeft.data.embedded import EMBEDDED_CHAT
    from fedpeft.data.sources import _load_raw

    raw = EMBEDDED_CHAT[name]() if name in EMBEDDED_CHAT else _load_raw(name)
    if isinstance(raw, DatasetDict):
        train = chat_rows(raw["train"] if "train" in raw else raw[next(iter(raw))], name)
        test = chat_rows(raw["test"], name) if "test" in raw else None
    else:
        train, test = chat_rows(raw, name), None
    for split in (train, test):
        if split is None:
            continue
        bad = next((i for i, (p, r) in enumerate(zip(split[PROMPT], split[RESPONSE]))
                    if not isinstance(p, str) or not isinstance(r, str) or not p.strip() or not r.strip()), None)
        if bad is not None:
            raise UsageError(f"--dataset {name!r}: row {bad} has an empty or missing prompt or response; "
                             "every row needs both as non-blank text")
    if test is None:
        try:
            train, test = stratified_split(train, "label", test_fraction)
        except (UsageError, ValueError):  # a topic too rare to stratify: a plain seeded split
            parts = train.train_test_split(test_size=test_fraction, seed=SPLIT_SEED)
            train, test = parts["train"], parts["test"]
    if len(test) > max_test_examples:
        test = test.shuffle(seed=SPLIT_SEED).select(range(max_test_examples))
    names = list(train.features["label"].names)
    return LabeledSplits(train=train, test=test, num_labels=len(names), label_names=names)


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The user turn formatted by the chat template, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def chat_parts(tokenizer: Any, prompt: str, response: str) -> tuple[str, str]:
    """``(prompt part, answer part)`` of the formatted chat; their concatenation is the chat."""
    head = prompt_text(tokenizer, prompt)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise UsageError("the model's chat template formats a user turn with the generation prompt differently "
                         "from the same turn inside a chat; --task causal-lm needs a template where the first is "
                         "a prefix of the second")
    return head, full[len(head):]


def fit(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a chat to ``max_length`` tokens: whole if it fits; else the answer keeps at least
    ``min(len(answer), max_length // 2)`` tokens (its end is cut) and the prompt keeps its last
    tokens (the question's end and the generation prompt), so every row has answer tokens."""
    if len(prompt_ids) + len(answer_ids) <= max_length:
        return prompt_ids, answer_ids
    answer = answer_ids[: max(max_length - len(prompt_ids), min(len(answer_ids), max_length // 2))]
    keep = max_length - len(answer)
    return (prompt_ids[len(prompt_ids) - keep:] if keep > 0 else []), answer


def tokenize_chats(rows: Dataset, tokenizer: Any, max_length: int) -> ChatSplit:
    """Every row of ``rows`` as prompt + answer token ids (:func:`chat_parts`, :func:`fit`)."""
    data = rows.select_columns([PROMPT, RESPONSE, "label"])[:]
    heads, tails = zip(*(chat_parts(tokenizer, p, r) for p, r in zip(data[PROMPT], data[RESPONSE]))) if len(rows) else ((), ())
    head_ids = tokenizer(list(heads), add_special_tokens=False)["input_ids"] if heads else []
    tail_ids = tokenizer(list(tails), add_special_tokens=False)["input_ids"] if tails else []
    ids, prompt_lengths = [], []
    for p, a in zip(head_ids, tail_ids):
        p, a = fit(list(p), list(a), max_length)
        ids.append(np.asarray(p + a, dtype=np.int32))
        prompt_lengths.append(len(p))
    return ChatSplit(input_ids=ids, prompt_lengths=np.asarray(prompt_lengths, dtype=np.int64),
                     labels=np.asarray(data["label"], dtype=np.int64))


def collate_chats(split: ChatSplit, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows padded on the right to the longest among them; ``labels`` are the token ids on the
    answer positions and -100 on prompt and padding (the model shifts them by one itself)."""
    seqs = [split.input_ids[i] for i in rows]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    labels = np.full((len(seqs), width), IGNORE, dtype=np.int64)
    for j, (row, s) in enumerate(zip(rows, seqs)):
        ids[j, : len(s)] = s
        mask[j, : len(s)] = 1
        start = int(split.prompt_lengths[row])
        labels[j, start: len(s)] = s[start:]
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


def chat_eval_batches(split: ChatSplit, batch_size: int, pad_id: int,
                      shard: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
    """Length-sorted batches, every ``shard[1]``-th from ``shard[0]`` (as
    :func:`fedpeft.data.tokenized.eval_batches`)."""
    index, count = shard
    order = np.argsort(split.lengths, kind="stable")
    for start in list(range(0, len(order), batch_size))[index::count]:
        yield collate_chats(split, order[start: start + batch_size], pad_id)


__all__ = ["IGNORE", "ChatSplit", "chat_eval_batches", "chat_parts", "chat_rows", "collate_chats", "fit",
           "load_chat_splits", "prompt_text", "tokenize_chats"]
