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
def flower_task_identity(monkeypatch):
    """A Flower task identity (run 1, node 0, task 1) for tests that build ``Message``s outside
    a Flower runtime (Flower's runtimes set it; ``Message()`` reads it), undone after the test.

    The only place tests touch this Flower internal: on a Flower release other than the one
    the warm worker is pinned to, a missing module or attribute fails here, naming both."""
    from fedpeft.deploy.clientapp_worker import TESTED_FLOWER, installed_flower

    try:
        from flwr.supercore.task_identity import TaskIdentity

        for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            monkeypatch.setattr(TaskIdentity, attr, value)  # raises if Flower renamed it
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"flwr {installed_flower()} (tests written for {TESTED_FLOWER}) moved Flower's task "
                    f"identity ({exc}): update the flower_task_identity fixture in tests/conftest.py")


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


def make_poisoning_app(poison, metrics=None):
    """The honest ClientApp, except that client 0 replaces its upload by ``poison(state)`` and,
    with ``metrics``, its reply metrics by ``metrics(dict)``."""
    import torch
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedpeft.federation.client_app import app as honest_app

    app = ClientApp()

    @app.query()
    def query(msg, context):
        return honest_app(msg, context)

    @app.train()
    def train(msg, context):
        reply = honest_app(msg, context)
        if int(context.node_config["partition-id"]) != 0:
            return reply
        state = {k: torch.from_numpy(a.numpy().copy()) for k, a in reply.content["arrays"].items()}
        bad = poison(state)
        m = dict(reply.content["metrics"])
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in bad.items()}),
                                   "metrics": MetricRecord(metrics(m) if metrics else m)}), reply_to=msg)

    return app


@pytest.fixture
def poisoning_app():
    return make_poisoning_app
