"""Shared fixtures: everything runs offline on the embedded model and data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_cfg():
    """A small but real configuration on the embedded default model and data."""
    from fedpeft.config import RunConfig

    return RunConfig(clients=8, cohort=2, rounds=1, batch_size=16, max_test_examples=64, seed=0)
