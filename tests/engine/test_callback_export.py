"""ExportCallback alone, on the embedded model: nothing is written during the rounds; when the
run finishes, the released model (the iterate average under --ema, not the last iterate) is
written in the standard peft layout."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from fedpeft.engine.callbacks import ExportCallback
from fedpeft.engine.run import RunContext, ServerState
from fedpeft.engine.workspace import get_workspace
from fedpeft.iterate_average import IterateAverage
from fedpeft.settings import resolve


def test_the_released_ema_model_is_exported_when_the_run_finishes(tmp_path):
    cfg = resolve(dict(backend="inprocess", clients=4, cohort=2, rounds=2, max_client_examples=16,
                       max_test_examples=32, batch_size=8, output=str(tmp_path / "run")))
    ws = get_workspace(cfg)
    base = ws.adapter.trainable_state(ws.model)
    g = torch.Generator().manual_seed(0)
    iterates = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    state = ServerState(global_state=iterates[0], strategy=None, pipeline=None, server_opt=None, downlink=None,
                        privacy=None, streams=None, average=IterateAverage(0.5))
    for x in iterates:
        state.advance(x)
    run = RunContext(cfg, ws, state, plan={})
    callback = ExportCallback(tmp_path / "run" / "model")
    callback.on_start(run)
    assert not (tmp_path / "run" / "model").exists()
    callback.on_finish(run)
    exported = load_file(str(tmp_path / "run" / "model" / "adapter_model.safetensors"))
    # (0.5·x1 + x2) / 1.5: the bias-corrected EMA with β = 0.5
    want = {k: (0.5 * iterates[0][k].double() + iterates[1][k].double()) / 1.5 for k in base}
    for part in ("lora_A", "lora_B"):
        got = sorted(float(v.double().norm()) for k, v in exported.items() if part in k)
        expected = sorted(float(v.norm()) for k, v in want.items() if part in k)
        assert got and torch.allclose(torch.tensor(got), torch.tensor(expected), rtol=1e-5)
        last = sorted(float(v.double().norm()) for k, v in iterates[-1].items() if part in k)
        assert not torch.allclose(torch.tensor(got), torch.tensor(last), rtol=1e-3)  # not the last iterate
