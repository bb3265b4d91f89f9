"""Padding-free (packed) training batches give the padded batch's logits and gradients, and
are used only where that holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.data.tokenized import collate, shuffled_batches
from fedpeft.model.packing import ATTENTION, collate_packed, enable_packing, pack
from fedpeft.settings import resolve


@pytest.fixture(scope="module")
def ws():
    from fedpeft.engine.workspace import get_workspace

    return get_workspace(resolve({"backend": "inprocess", "max_test_examples": 64}))


def test_pack_layout_by_hand():
    seqs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    b = pack(seqs, np.array([1, 0, 1]))
    p = b["packing"]
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert (p.batch, p.width) == (3, 3)
    assert p.segments.tolist() == [0, 0, 0, 1, 2, 2]
    assert p.index.tolist() == [0, 1, 2, 3, 6, 7]  # row * width + column
    assert p.counts.tolist() == [3.0, 1.0, 2.0]
    assert p.key_mask[:, 0, 0, :].tolist() == [[True, True, True], [True, False, False], [True, True, False]]


def test_the_workspace_packs_the_default_model(ws):
    assert ws.packed
    config = ws.model.base_model.model.bert.config
    assert config._attn_implementation == ATTENTION


def test_packed_logits_and_gradients_equal_padded_and_single_example_runs(ws):
    """Three independent computations: each example alone (no padding at all), the padded
    batch, the packed batch (eval mode: dropout off)."""
    model = ws.model
    rows = np.array([3, 17, 40, 41, 99, 250, 600, 1000])
    lengths = [len(ws.train.input_ids[i]) for i in rows]
    assert len(set(lengths)) > 3  # padding matters in this batch
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    padded = collate(ws.train, rows, ws.pad_id)
    packed = pack([ws.train.input_ids[i] for i in rows], ws.train.labels[rows])
    outs = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        out = model(**batch)
        outs[name] = (out.logits.detach(), torch.autograd.grad(out.loss, params))
    with torch.no_grad():
        single = torch.cat([model(**collate(ws.train, rows[i : i + 1], ws.pad_id)).logits for i in range(len(rows))])
    torch.testing.assert_close(outs["packed"][0], single, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outs["packed"][0], outs["padded"][0], atol=2e-5, rtol=1e-4)
    for gp, gq in zip(outs["packed"][1], outs["padded"][1], strict=True):
        torch.testing.assert_close(gp, gq, atol=1e-5, rtol=1e-3)


def test_packed_batches_hold_the_same_rows_as_padded_batches(ws):
    rows = np.arange(50, 90)
    a = [b["labels"].tolist() for b in shuffled_batches(ws.train, rows, 8, np.random.default_rng(4), ws.pad_id)]
    p = list(shuffled_batches(ws.train, rows, 8, np.random.default_rng(4), ws.pad_id, collate_packed))
    assert [b["labels"].tolist() for b in p] == a
    real = sum(int(b["packing"].counts.sum()) for b in p)
    assert real == sum(len(ws.train.input_ids[i]) for i in rows)
    assert sum(b["input_ids"].shape[1] for b in p) == real  # no padding token anywhere


def test_padded_batches_keep_their_mask_under_the_packed_attention(ws):
    """Evaluation and DP-SGD keep padded batches: the wrapped implementation must still get
    its padding mask (without it, pads would be attended to)."""
    model = ws.model
    model.eval()
    rows = np.array([0, 1, 2])
    with torch.no_grad():
        batch = model(**collate(ws.train, rows, ws.pad_id)).logits
        alone = torch.cat([model(**collate(ws.train, rows[i : i + 1], ws.pad_id)).logits for i in range(3)])
    torch.testing.assert_close(batch, alone, atol=2e-5, rtol=1e-4)


def test_a_model_whose_packed_forward_differs_is_left_padded(monkeypatch, ws):
    """The check, not a name list, decides: break the packed attention and the workspace
    keeps padded batches with the model's own attention."""
    from fedpeft.model import packing

    config = ws.model.base_model.model.bert.config
    real = packing.packed_attention

    def wrong(module, query, key, value, attention_mask, packing=None, **kw):  # noqa: ANN001, ANN202
        out, w = real(module, query, key, value, attention_mask, packing=packing, **kw)
        return (out * 1.01 if packing is not None else out), w

    monkeypatch.setattr(packing, "packed_attention", wrong)
    rows = np.arange(8)
    try:
        assert not enable_packing(ws.model, ws.train, rows, ws.pad_id)
        assert config._attn_implementation == "sdpa"
    finally:
        monkeypatch.undo()
        assert enable_packing(ws.model, ws.train, rows, ws.pad_id)


def test_cls_pooling_is_not_packed():
    """A CLS head reads position 0 of the row: packing would feed it one token."""
    from fedpeft.engine.workspace import _build

    cls = _build(resolve({"backend": "inprocess", "pooling": "cls", "max_test_examples": 64}))
    assert not cls.packed
    assert cls.model.base_model.model.config._attn_implementation != ATTENTION
