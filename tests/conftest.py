"""Shared fixtures: everything runs offline on the embedded model and data."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# cached encoder features (fedpeft.data.features) of test runs never land in ~/.cache
os.environ.setdefault("FEDPEFT_CACHE_DIR", tempfile.mkdtemp(prefix="fedpeft-test-cache-"))


@pytest.fixture
def tiny_cfg():
    """A small but real configuration on the embedded default model and data."""
    from fedpeft.config import RunConfig

    return RunConfig(clients=8, cohort=2, rounds=1, batch_size=16, max_test_examples=64, seed=0)


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory):
    """A 240-row csv (text,label) cut from the embedded Rotten Tomatoes data: small enough that
    encoder features for it are computed in seconds."""
    import csv

    from fedpeft.data.embedded import EMBEDDED

    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    ds = EMBEDDED["rotten-tomatoes"]().shuffle(seed=11).select(range(240))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(zip(ds["text"], ds["label"]))
    return path
