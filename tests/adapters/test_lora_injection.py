"""LoRA is injected only where configured; the frozen base never changes in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.adapters import AdapterSpec, build_adapter
from fedpeft.data.tokenized import shuffled_batches
from fedpeft.engine.workspace import frozen_fingerprint, get_workspace
from fedpeft.training.local import train_local


@pytest.fixture(scope="module")
def ws():
    from fedpeft.config import RunConfig

    return get_workspace(RunConfig(max_test_examples=64, seed=0))


def test_lora_only_on_target_modules(ws):
    trainable = [n for n, p in ws.model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    # 6 layers x {query, value} x {A, B}
    assert len(lora) == 6 * 2 * 2
    assert all((".query." in n or ".value." in n) for n in lora)
    assert not any(".key." in n or ".dense." in n for n in lora)
    others = [n for n in trainable if "lora_" not in n]
    assert others and all("classifier" in n for n in others)
    # LoRA init: B = 0 so the adapted model starts equal to the base
    assert all(float(p.abs().sum()) == 0 for n, p in ws.model.named_parameters() if "lora_B" in n)


def test_rank_and_targets_follow_spec():
    from fedpeft.model.loading import load_classifier

    adapter = build_adapter("lora", AdapterSpec(rank=4, alpha=8, target_modules=("key",), seed=1))
    model = adapter.inject(load_classifier("embedded:all-MiniLM-L6-v2", 2, seed=0))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    assert len(shapes) == 12 and all(".key." in n for n in shapes)
    assert all(s in [(4, 384), (384, 4)] for s in shapes.values())


def test_base_unchanged_and_adapter_changed_after_training(ws):
    before = frozen_fingerprint(ws.model)
    start = ws.adapter.trainable_state(ws.model)
    rng = np.random.default_rng(0)
    rows = np.arange(64)
    result = train_local(ws.model, [shuffled_batches(ws.train, rows, 16, rng, ws.pad_id)], lr=1e-2)
    assert result.steps == 4 and result.examples == 64
    after = frozen_fingerprint(ws.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    end = ws.adapter.trainable_state(ws.model)
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert any("lora_B" in k for k in changed) and any("classifier" in k for k in changed)
    ws.adapter.load_state(ws.model, start)  # restore the shared workspace


@pytest.mark.parametrize("adapter", ["lora", "ffa-lora"])
def test_lora_layers_restricts_injection_to_the_chosen_layers(adapter):
    """--lora-layers 5 --rank 1: LoRA only in encoder layer 5; d = 2·(1·384 + 384·1) + 770 for
    LoRA (A and B of query and value, plus the head); FFA-LoRA trains B only."""
    from fedpeft.model.loading import load_classifier

    spec = AdapterSpec(rank=1, layers=(5,))
    model = build_adapter(adapter, spec).inject(load_classifier("embedded:all-MiniLM-L6-v2", 2, seed=0))
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(".layer.5." in n for n in lora)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert d == (2 * (384 + 384) if adapter == "lora" else 2 * 384) + 770
