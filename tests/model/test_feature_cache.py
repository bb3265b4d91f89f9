"""The frozen part computed once (``--adapter head``): cached features give the full model's
logits and gradients, are computed once per machine, and drive whole runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.adapters import AdapterSpec, build_adapter
from fedpeft.settings import resolve
from fedpeft.data import features as feats
from fedpeft.data.features import FeatureSplit
from fedpeft.data.tokenized import collate, tokenize
from fedpeft.engine.workspace import _cache, get_workspace
from fedpeft.model.feature_head import FeatureClassifier, head_dropout
from fedpeft.model.loading import load_classifier, load_tokenizer
from fedpeft.simulation import simulate

TEXTS = ["a warm, funny and smart film", "tedious and overlong", "the cast is superb",
         "nothing works here", "a modest pleasure", "i laughed, i cried"]


def _full_and_cached():
    model = build_adapter("head", AdapterSpec()).inject(
        load_classifier("embedded:all-MiniLM-L6-v2", 2, seed=0))
    split = tokenize(TEXTS, [1, 0, 1, 0, 1, 1], load_tokenizer("embedded:all-MiniLM-L6-v2"), 64)
    batch = collate(split, np.arange(len(TEXTS)), 0)
    features = feats.head_inputs(model, iter([batch]))
    head = FeatureClassifier(model.classifier, head_dropout(model))
    return model, head, batch, features


def test_cached_features_give_the_full_models_logits_and_head_gradients():
    """Tolerance 1e-5 (float32 reductions in a different order give ~1e-7 here)."""
    model, head, batch, features = _full_and_cached()
    assert features.shape == (len(TEXTS), 384)
    model.eval()
    head.eval()
    full = model(**batch)
    cached = head(features=torch.from_numpy(features), labels=batch["labels"])
    torch.testing.assert_close(cached.logits, full.logits, atol=1e-5, rtol=1e-5)
    grads = []
    for out in (full, cached):
        model.zero_grad(set_to_none=True)
        out = model(**batch) if out is full else head(features=torch.from_numpy(features), labels=batch["labels"])
        out.loss.backward()
        grads.append([model.classifier.weight.grad.clone(), model.classifier.bias.grad.clone()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # only the head is trainable: the encoder has no gradient at all
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("classifier"))


def test_head_workspace_computes_features_once_per_machine(small_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPEFT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = resolve({"adapter": "head", "dataset": str(small_csv), "max_test_examples": 24, "clients": 4, "cohort": 2})
    _cache.clear()
    ws = get_workspace(cfg)
    assert isinstance(ws.model, FeatureClassifier) and isinstance(ws.train, FeatureSplit)
    assert set(ws.initial_state) == {"classifier.weight", "classifier.bias"}
    assert ws.train.features.shape[1] == 384 and len(ws.train) + len(ws.test) == 240
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 1
    first = ws.train.features.copy()

    def boom(*a, **k):
        raise AssertionError("features recomputed instead of loaded from the cache")

    monkeypatch.setattr(feats, "head_inputs", boom)  # what split_features calls
    _cache.clear()
    again = get_workspace(cfg)
    np.testing.assert_array_equal(again.train.features, first)


def test_head_only_dp_run_uploads_770_coordinates_and_plans_them(small_csv, tmp_path):
    cfg = resolve({"backend": "inprocess", "adapter": "head", "dataset": str(small_csv), "max_test_examples": 40,
                   "clients": 10, "cohort": 10, "rounds": 2, "epsilon": 4.0, "clip": 5.0, "local_epochs": 3,
                   "lr": 0.03, "server_opt": "fedadam", "server_lr": 0.1, "diagnostics": True,
                   "output": str(tmp_path / "run")})
    import json

    from fedpeft.results import ResultsWriter

    out = simulate(cfg, [ResultsWriter(cfg.output)])
    plan = json.loads((tmp_path / "run" / "results.json").read_text())["plan"]
    assert plan["utility"]["trainable_dim"] == 770 == plan["trainable_parameters"]
    z = out.final.noise_multiplier
    assert plan["utility"]["noise_to_signal"] == pytest.approx(z * 770 ** 0.5 / 10)
    assert all(np.isfinite(r.eval_loss) for r in out.rounds) and 0 < out.final.epsilon <= 4.0
    assert all(r.rejected == 0 and r.clients_sampled == 10 for r in out.unpublished)
