"""Tokenised splits cached on disk: the same ids as a fresh tokenisation, loaded without
tokenising on a hit, and missed whenever an input changes (texts, max_length, tokenizer files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fedpeft.data.token_cache import cached_tokenize, tokenizer_identity
from fedpeft.data.tokenized import tokenize
from fedpeft.model.loading import load_tokenizer, resolve_model_path

MODEL = "embedded:all-MiniLM-L6-v2"
TEXTS = ["a warm, funny and smart film", "tedious and overlong", "", "the cast is superb " * 40,
         "nothing works here", "naïve — but charming ☺"]
LABELS = [1, 0, 0, 1, 0, 1]


class CountingTokenizer:
    """The real tokenizer, counting calls: a cache hit must not call it."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDPEFT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def _assert_same(a, b) -> None:  # noqa: ANN001
    assert len(a) == len(b)
    for x, y in zip(a.input_ids, b.input_ids):
        assert x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_cached_ids_equal_a_fresh_tokenisation_and_a_hit_does_not_tokenise(cache) -> None:
    tok = CountingTokenizer(load_tokenizer(MODEL))
    ident = tokenizer_identity(tok.inner, resolve_model_path(MODEL))
    fresh = tokenize(TEXTS, LABELS, tok.inner, 32)
    first = cached_tokenize(TEXTS, LABELS, tok, 32, ident)
    second = cached_tokenize(TEXTS, LABELS, tok, 32, ident)
    assert tok.calls == 1, "the second call should load, not tokenise"
    _assert_same(first, fresh)
    _assert_same(second, fresh)
    assert max(len(x) for x in second.input_ids) == 32  # truncation kept
    assert len(list(cache.glob("*.npz"))) == 1


def test_a_changed_text_max_length_or_tokenizer_file_misses(cache, tmp_path) -> None:
    tok = CountingTokenizer(load_tokenizer(MODEL))
    ident = tokenizer_identity(tok.inner, resolve_model_path(MODEL))
    cached_tokenize(TEXTS, LABELS, tok, 32, ident)
    edited = [*TEXTS[:-1], TEXTS[-1] + "!"]
    _assert_same(cached_tokenize(edited, LABELS, tok, 32, ident), tokenize(edited, LABELS, tok.inner, 32))
    _assert_same(cached_tokenize(TEXTS, LABELS, tok, 16, ident), tokenize(TEXTS, LABELS, tok.inner, 16))
    # the same tokenizer files elsewhere, then one of them touched: both are other tokenizers
    copy = tmp_path / "model-copy"
    shutil.copytree(resolve_model_path(MODEL), copy)
    cached_tokenize(TEXTS, LABELS, tok, 32, tokenizer_identity(tok.inner, str(copy)))
    vocab = next(p for p in copy.iterdir() if p.name in ("tokenizer.json", "vocab.txt"))
    stat = vocab.stat()
    import os

    os.utime(vocab, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    cached_tokenize(TEXTS, LABELS, tok, 32, tokenizer_identity(tok.inner, str(copy)))
    assert tok.calls == 5 and len(list(cache.glob("*.npz"))) == 5
    # labels are not part of the key: they are passed through, never read from the cache
    relabelled = cached_tokenize(TEXTS, [0] * len(TEXTS), tok, 32, ident)
    assert tok.calls == 5 and relabelled.labels.tolist() == [0] * len(TEXTS)


def test_a_damaged_cache_entry_is_recomputed(cache) -> None:
    tok = CountingTokenizer(load_tokenizer(MODEL))
    ident = tokenizer_identity(tok.inner, resolve_model_path(MODEL))
    cached_tokenize(TEXTS, LABELS, tok, 32, ident)
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:40])
    again = cached_tokenize(TEXTS, LABELS, tok, 32, ident)
    assert tok.calls == 2
    _assert_same(again, tokenize(TEXTS, LABELS, tok.inner, 32))


def test_a_rebuilt_workspace_loads_its_tokens_from_disk(small_csv, cache, monkeypatch) -> None:
    from fedpeft.data import token_cache
    from fedpeft.engine.workspace import _cache, get_workspace
    from fedpeft.settings import resolve

    cfg = resolve({"dataset": str(small_csv), "max_test_examples": 24, "clients": 4, "cohort": 2})
    _cache.clear()
    ws = get_workspace(cfg)
    assert len(list(cache.glob("*.npz"))) == 2  # train and test split
    first = ws.train

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("tokenised again instead of loaded from the cache")

    monkeypatch.setattr(token_cache, "tokenize", boom)
    _cache.clear()
    again = get_workspace(cfg)
    _assert_same(again.train, first)
    _cache.clear()
