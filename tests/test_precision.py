"""--precision bf16: opt-in autocast of local training, checked against plain torch and fp32."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedpeft.config import RunConfig
from fedpeft.errors import UsageError
from fedpeft.engine.client import ClientRound, train_client
from fedpeft.engine.workspace import get_workspace
from fedpeft.settings import resolve
from fedpeft.training.local import train_local
from fedpeft.training.precision import forward_precision


def test_bf16_runs_the_matmuls_in_bfloat16_and_fp32_does_not():
    torch.manual_seed(0)
    layer, x = nn.Linear(16, 8), torch.randn(4, 16)
    with forward_precision("bf16")():
        low = layer(x)
    expected = nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16())
    assert low.dtype == torch.bfloat16 and torch.equal(low, expected)
    with forward_precision("fp32")():
        full = layer(x)
    assert full.dtype == torch.float32 and torch.equal(full, nn.functional.linear(x, layer.weight, layer.bias))
    assert not torch.equal(full, low.float())  # bfloat16 keeps ~3 digits: the two differ


class _Regression(nn.Module):
    """A transformers-shaped model (``model(**batch).loss``) small enough to train in a test."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=nn.functional.mse_loss(self.net(x).float().squeeze(-1), labels))


def test_bf16_training_follows_the_fp32_trajectory_step_by_step():
    """Each forward sees the weights the previous step wrote. Autocast caches its bfloat16 copies
    of the weights until its context exits: one context held across the optimizer steps would
    keep the first step's weights, and the mean loss would stay at the starting loss."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    batch = {"x": x, "labels": x[:, :4].sum(-1)}
    start = _Regression()
    with torch.no_grad():
        initial = float(start(**batch).loss)
    means = {}
    for name in ("fp32", "bf16"):
        model = _Regression()
        model.load_state_dict(start.state_dict())
        res = train_local(model, [[batch] * 30], lr=0.01, forward_context=forward_precision(name))
        means[name] = res.mean_loss
    assert means["fp32"] < 0.6 * initial  # it learns
    assert means["bf16"] == pytest.approx(means["fp32"], rel=0.05) and means["bf16"] != means["fp32"]
    # the pitfall this guards against, shown on the same model: the stale cache keeps the loss
    model = _Regression()
    model.load_state_dict(start.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stale = train_local(model, [[batch] * 30], lr=0.01)
    assert stale.mean_loss > 0.9 * initial


def test_a_bf16_client_visit_uploads_float32_near_the_fp32_update(tmp_path):
    cfg = RunConfig(max_test_examples=64, seed=0)  # same workspace key as other test modules
    ws = get_workspace(cfg)
    initial = {k: v.clone() for k, v in ws.initial_state.items()}
    rnd = ClientRound(3, 100, 1, None)  # ~85 rows: 11 AdamW steps
    runs = {}
    for name in ("fp32", "bf16", "fp32-again"):
        c = dataclasses.replace(cfg, precision=name.split("-")[0])
        out = train_client(ws, c, rnd, ws.initial_state, tmp_path / name)
        assert all(v.dtype == torch.float32 for v in out.upload.values())  # parameters stay float32
        delta = torch.cat([(out.upload[k] - initial[k]).flatten() for k in sorted(out.upload)])
        runs[name] = (out.result.mean_loss, delta)
    (loss32, d32), (loss16, d16), (again, d_again) = runs["fp32"], runs["bf16"], runs["fp32-again"]
    assert again == loss32 and torch.equal(d_again, d32)  # fp32 repeats exactly: the difference is bf16's
    # the same data order and seed with the matmuls rounded to bfloat16: nearly the same loss
    # and update (with autocast held across the steps: loss 0.701 vs 0.669, cosine 0.58)
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=0.02)
    assert float(nn.functional.cosine_similarity(d16, d32, dim=0)) > 0.9


@pytest.mark.parametrize("values, message", [
    ({"precision": "fp16"}, "--precision 'fp16' is invalid; allowed: bf16, fp32"),
    ({"precision": "bf16", "dp": "sample", "epsilon": 3.0}, "--precision bf16 with --dp sample"),
])
def test_bad_precision_settings_are_refused_in_one_line(values, message):
    with pytest.raises(UsageError, match=message) as err:
        resolve(values)
    assert "\n" not in str(err.value)


def test_bf16_under_user_level_dp_is_allowed():
    # the server clips the float32 update, so the guarantee does not depend on the precision
    assert resolve({"precision": "bf16", "epsilon": 2.0, "clients": 100}).precision == "bf16"
