"""A tiny random Llama and its chat data, built once per test session (offline, ~1 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_chat import build_tiny_llama, write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """``(model dir, dataset jsonl)`` of a randomly initialised 2-layer Llama (hidden 32)."""
    root = tmp_path_factory.mktemp("tiny-lm")
    return build_tiny_llama(root), write_dataset(root)
