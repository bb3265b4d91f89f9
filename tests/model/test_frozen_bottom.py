"""The frozen bottom computed once (``--train-top-k``): the cached input of the lowest trained
layer gives the full model's logits, LoRA gradients and DP-SGD per-example gradients, is
computed once per machine, and drives whole runs of every LoRA-family adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedpeft.adapters import AdapterSpec, build_adapter
from fedpeft.data.hidden_states import HiddenSplit
from fedpeft.data.tokenized import TokenizedSplit, collate, tokenize
from fedpeft.errors import UsageError
from fedpeft.engine.workspace import _cache, get_workspace
from fedpeft.model import frozen_bottom as fb
from fedpeft.model.loading import load_classifier, load_tokenizer
from fedpeft.model.packing import collate_packed, enable_packing
from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve
from fedpeft.simulation import simulate

MODEL = "embedded:all-MiniLM-L6-v2"
TEXTS = ["a warm, funny and smart film", "tedious and overlong", "the cast is superb",
         "nothing works here at all, not the plot, not the jokes", "a modest pleasure", "i laughed, i cried"]
LABELS = [1, 0, 1, 0, 1, 1]


def _model_and_splits(adapter: str = "lora", layers: tuple[int, ...] = (4, 5)):
    model = build_adapter(adapter, AdapterSpec(rank=4, layers=layers)).inject(load_classifier(MODEL, 2, seed=0))
    tokens = tokenize(TEXTS, LABELS, load_tokenizer(MODEL), 64)
    first = fb.first_trained_layer(model)
    arrays = fb.layer_inputs(model, tokens, first, pad_id=0, batch_size=4)
    return model, tokens, HiddenSplit(arrays["states"], arrays["offsets"], tokens.labels), first


def _logits_and_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    out = model(**batch)
    grads = torch.autograd.grad(out.loss, params)
    return out.logits.detach(), grads


def _perturb_lora_b(model):
    """B = 0 at injection makes LoRA a no-op; give it values so gradients reach A too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("adapter", ["lora", "ffa-lora", "dp-dylora"])
def test_cached_bottom_gives_the_full_models_logits_and_lora_gradients(adapter):
    model, tokens, hidden, first = _model_and_splits(adapter)
    assert first == 4 and hidden.states.shape == (int(tokens.lengths.sum()), 384)
    _perturb_lora_b(model)
    rows = np.arange(len(TEXTS))
    full_logits, full_grads = _logits_and_grads(model, collate(tokens, rows, 0))
    fb.use_cached_bottom(model, first)
    assert enable_packing(model, hidden, rows, 0)  # the packed attention, checked against padded
    for batch in (hidden.collate(rows), collate_packed(hidden, rows)):  # padded and packed
        logits, grads = _logits_and_grads(model, batch)
        torch.testing.assert_close(logits, full_logits, atol=1e-5, rtol=1e-5)
        assert len(grads) == len(full_grads) > 2  # LoRA factors and the head
        for a, b in zip(grads, full_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a full forward still works on the switched model (export, predict use it)
    torch.testing.assert_close(model(**collate(tokens, rows, 0)).logits, full_logits, atol=1e-6, rtol=1e-6)


def test_cached_bottom_gives_the_full_models_per_example_gradients_under_dp_sgd():
    """Opacus' per-example gradients (what DP-SGD clips) through the top layers only equal
    those through the whole encoder."""
    from opacus import GradSampleModule

    model, tokens, hidden, first = _model_and_splits("lora", (5,))
    _perturb_lora_b(model)
    rows = np.arange(len(TEXTS))
    per_example = []
    for cached, batch in ((0, collate(tokens, rows, 0)), (first, hidden.collate(rows))):
        fb.use_cached_bottom(model, cached)
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        gsm.train()  # Opacus records activations in train mode only: switch dropout off instead
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if hasattr(m, "dropout_prob"):
                m.dropout_prob = 0.0
        gsm(**batch).loss.backward()
        per_example.append({n: p.grad_sample.detach().clone() for n, p in model.named_parameters()
                            if p.requires_grad})
        gsm.cleanup()
        model.zero_grad(set_to_none=True)
    full, top = per_example
    assert set(full) == set(top) and all(g.shape[0] == len(TEXTS) for g in full.values())
    for name in full:
        torch.testing.assert_close(top[name], full[name], atol=1e-5, rtol=1e-4)


def test_first_trained_layer_is_the_lowest_adapted_one_and_0_when_the_bottom_trains():
    lora = lambda layers: build_adapter("lora", AdapterSpec(layers=layers)).inject(load_classifier(MODEL, 2, 0))  # noqa: E731
    assert fb.first_trained_layer(lora((5,))) == 5
    assert fb.first_trained_layer(lora((2, 5))) == 2
    assert fb.first_trained_layer(lora(())) == 0
    model = lora((5,))
    model.base_model.model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    assert fb.first_trained_layer(model) == 0  # trained embeddings: nothing below is frozen


def test_train_top_k_means_the_top_k_layers_and_refuses_bad_values():
    assert resolve({"train_top_k": 2}).lora_layers == "4,5"
    assert resolve({"train_top_k": 1, "lora_layers": "5"}).lora_layers == "5"
    with pytest.raises(UsageError, match=r"^--train-top-k 7 is invalid; allowed: 1\.\.6"):
        resolve({"train_top_k": 7})
    with pytest.raises(UsageError, match="contradicts --lora-layers '3'"):
        resolve({"train_top_k": 1, "lora_layers": "3"})
    with pytest.raises(UsageError, match="--train-top-k -1 is invalid"):
        resolve({"train_top_k": -1})


def test_top_k_workspace_caches_the_bottom_once_per_machine(small_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPEFT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = resolve({"train_top_k": 1, "dataset": str(small_csv), "max_test_examples": 24, "clients": 4,
                   "cohort": 2, "backend": "inprocess"})
    _cache.clear()
    ws = get_workspace(cfg)
    assert ws.cached_layers == 5 and isinstance(ws.train, HiddenSplit) and isinstance(ws.test, HiddenSplit)
    assert isinstance(ws.train.states, np.memmap)  # memory-mapped: forked workers share the pages
    assert len(ws.train) + len(ws.test) == 240
    assert len(list((tmp_path / "cache" / "hidden").glob("*/arrays.json"))) == 1
    first = np.array(ws.train.states)

    def boom(*a, **k):
        raise AssertionError("the bottom was recomputed instead of loaded from the cache")

    monkeypatch.setattr("fedpeft.engine.workspace.layer_inputs", boom)
    _cache.clear()
    again = get_workspace(cfg)
    np.testing.assert_array_equal(np.asarray(again.train.states), first)
    _cache.clear()
    off = get_workspace(resolve({**{k: getattr(cfg, k) for k in ("dataset", "max_test_examples", "clients", "cohort")},
                                 "train_top_k": 1, "bottom_cache": False, "backend": "inprocess"}))
    assert off.cached_layers == 0 and isinstance(off.train, TokenizedSplit)


@pytest.mark.parametrize("adapter,dp", [("lora", None), ("dp-dylora", "user"), ("ffa-lora", "sample")])
def test_top_k_runs_train_every_lora_adapter_on_the_cache(adapter, dp, small_csv, tmp_path):
    """Whole runs on the cached bottom, without DP, under user-level DP and under DP-SGD: the
    plan says which layers were cached, and only top-layer tensors (plus the head) moved."""
    _cache.clear()
    values = {"backend": "inprocess", "adapter": adapter, "train_top_k": 1, "dataset": str(small_csv),
              "max_test_examples": 40, "clients": 4, "cohort": 4, "rounds": 2, "batch_size": 16,
              "output": str(tmp_path / "run")}
    if dp is not None:
        values.update(dp=dp, epsilon=8.0)
    cfg = resolve(values)
    simulate(cfg, [ResultsWriter(cfg.output)])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["plan"]["cached_layers"] == 5
    assert results["final"]["accuracy"] is not None
    if dp is not None:
        assert 0 < results["final"]["epsilon"] <= 8.0
    ws = get_workspace(cfg)
    assert ws.cached_layers == 5
    assert all(".layer.5." in k or "classifier" in k for k in ws.initial_state)
