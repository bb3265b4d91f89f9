"""--ema in a run: the model evaluated (and exported) is the EMA of the trajectory's iterates,
the trajectory and ε are those of the run without it, and a resume restores the average."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from fedpeft.federation.central_eval import local_evaluator
from fedpeft.federation.client_app import app as honest_app
from fedpeft.federation.local_grid import LocalGrid
from fedpeft.federation.server import run_federation
from fedpeft.settings import resolve

BASE = dict(backend="inprocess", max_client_examples=16, max_test_examples=64, batch_size=8, clients=6,
            cohort=3, rounds=4, epsilon=8.0, insecure_reproducible_noise=True, adapter="lora", rank=2)


def _run(tmp_path, name: str, ema: float):
    seen: list[dict[str, torch.Tensor]] = []

    def evaluator(ws):
        inner = local_evaluator(ws)

        def ev(state):
            seen.append({k: v.detach().clone() for k, v in state.items()})
            return inner(state)
        return ev

    cfg = resolve({**BASE, "ema": ema, "output": str(tmp_path / name)})
    out = run_federation(LocalGrid(honest_app, 6), cfg, [], evaluator=evaluator)
    return out, seen


def test_evaluated_model_is_the_ema_of_the_last_iterates_and_eps_is_unchanged(tmp_path):
    beta = 0.6
    plain, iterates = _run(tmp_path, "plain", 0.0)
    averaged, evaluated = _run(tmp_path, "ema", beta)
    assert len(iterates) == len(evaluated) == 4
    assert averaged.final.epsilon == plain.final.epsilon
    for t in range(1, 5):
        w = np.array([beta ** (t - i) for i in range(1, t + 1)])
        for k, got in evaluated[t - 1].items():
            want = sum(wi * iterates[i][k].double() for i, wi in enumerate(w)) / w.sum()
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # the last round's average differs from its iterate (the noise is averaged), and it is exported
    key = next(k for k in iterates[-1] if "lora_B" in k)
    assert not torch.allclose(evaluated[-1][key], iterates[-1][key])
    exported = load_file(str(tmp_path / "ema" / "model" / "adapter_model.safetensors"))
    norms = sorted(float(v.float().norm()) for k, v in exported.items() if "lora_B" in k)
    want = sorted(float(v.float().norm()) for k, v in evaluated[-1].items() if "lora_B" in k)
    np.testing.assert_allclose(norms, want, rtol=1e-5)
