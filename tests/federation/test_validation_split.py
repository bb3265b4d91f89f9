"""``--validation-fraction`` in whole runs: the server scores the model on training rows no client
holds, the score is what the exported model gets on the rows datasets' own stratified split holds
out, and under DP it is published like the test accuracy while the split's size is not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve
from fedpeft.simulation import simulate

TINY = dict(backend="inprocess", max_client_examples=16, batch_size=8, clients=4, cohort=4, rounds=1,
            validation_fraction=0.25, max_test_examples=64)


def _run(tmp_path, small_csv, name, **kw):
    cfg = resolve({**TINY, "dataset": str(small_csv), **kw, "output": str(tmp_path / name)})
    return cfg, simulate(cfg, [ResultsWriter(tmp_path / name)])


def test_validation_accuracy_is_the_exported_models_on_datasets_own_held_out_rows(tmp_path, small_csv):
    from fedpeft.data.holdout import VALIDATION_SEED
    from fedpeft.data.sources import load_splits
    from fedpeft.engine.workspace import get_workspace
    from fedpeft.inference import evaluate, load_model

    cfg, out = _run(tmp_path, small_csv, "run")
    final = out.final
    assert out.rounds[-1].validation_accuracy == final.validation_accuracy is not None
    # independent reference: the rows datasets' train_test_split holds out of the train split,
    # scored by the exported model loaded through peft (its own tokenisation and forward)
    train = load_splits(str(small_csv), "text", "label", cfg.test_fraction, cfg.max_test_examples).train
    held = train.train_test_split(test_size=0.25, seed=VALIDATION_SEED, stratify_by_column="label")["test"]
    ref = evaluate(load_model(tmp_path / "run" / "model"), held["text"], held["label"], "csv", "validation")
    assert ref.examples == 54  # ceil(0.25 * 216 training rows)
    assert final.validation_accuracy == round(ref.accuracy * 54) / 54  # (inference averages in float32)
    assert out.rounds[-1].validation_loss == pytest.approx(ref.loss, rel=1e-4)
    # no client was given a validation row, and the clients hold the rest
    ws = get_workspace(cfg)
    parts = ws.partitions(cfg.partition, cfg.clients, cfg.dirichlet_alpha, cfg.seed)
    rows = np.concatenate([parts.indices(i) for i in range(cfg.clients)])
    assert np.intersect1d(rows, ws.holdout.validation_rows).size == 0 and len(rows) == 216 - 54
    plan = json.loads((tmp_path / "run" / "results.json").read_text())["plan"]
    assert (plan["train_examples"], plan["validation_examples"]) == (162, 54)


def test_without_the_option_nothing_is_held_out(tmp_path, small_csv):
    cfg, out = _run(tmp_path, small_csv, "none", validation_fraction=0.0)
    assert out.final.validation_accuracy is None and out.rounds[-1].validation_accuracy is None
    plan = json.loads((tmp_path / "none" / "results.json").read_text())["plan"]
    assert plan["train_examples"] == 216 and "validation_examples" not in plan


def test_under_dp_validation_accuracy_is_published_and_the_split_size_is_not(tmp_path, small_csv):
    cfg, out = _run(tmp_path, small_csv, "dp", clients=20, cohort=4, epsilon=3.0)
    saved = json.loads((tmp_path / "dp" / "results.json").read_text())
    last = saved["rounds"][-1]
    # a function of the released model and of rows no client holds, like eval_accuracy
    assert last["validation_accuracy"] is not None and last["eval_accuracy"] is not None
    assert saved["final"]["validation_accuracy"] == last["validation_accuracy"]
    # its count is a fraction of the clients' pool: withheld, as train_examples is
    assert "validation_examples" not in saved["plan"] and "train_examples" not in saved["plan"]
    assert last["train_loss"] is None  # the client statistics stay unpublished as before


def test_the_pool_scores_the_validation_rows_in_shards_as_the_driver_does(tmp_path, small_csv):
    """On the process pool each worker scores its share of the validation batches (the split is
    named in the evaluation message); together they are the in-process score."""
    from fedpeft.threads import process_cores

    if process_cores() < 2:
        pytest.skip("one core: the pool has one worker and evaluates in the driver")
    _, pool = _run(tmp_path, small_csv, "pool", backend="processes", rounds=2)
    _, local = _run(tmp_path, small_csv, "local", backend="inprocess", rounds=2)
    for a, b in zip(pool.rounds, local.rounds, strict=True):
        assert a.validation_accuracy == b.validation_accuracy is not None
        assert a.validation_loss == pytest.approx(b.validation_loss, rel=1e-4)
        assert a.eval_accuracy == b.eval_accuracy
        assert a.validation_loss != pytest.approx(a.eval_loss, rel=1e-6)  # other rows than the test split
