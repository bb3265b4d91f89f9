"""A ``--task causal-lm`` run's ``<output>/model/`` loads with transformers + peft alone (in a
subprocess that never imports fedpeft), reproduces the run's reported eval loss, and
``fedpeft generate`` prints the greedy completion that plain loop computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.engine.workspace import get_workspace
from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve
from fedpeft.simulation import simulate

LOADER = Path(__file__).with_name("plain_causal_lm_loader.py")
PROMPT = "What is two plus three?"


@pytest.mark.parametrize("adapter", ["lora", "ffa-lora"])
def test_export_loads_with_plain_peft_and_reproduces_the_eval_loss(tiny_lm, tmp_path, adapter):
    model, data = tiny_lm
    cfg = resolve({"task": "causal-lm", "model": str(model), "dataset": str(data), "backend": "inprocess",
                   "clients": 3, "cohort": 3, "rounds": 2, "lr": 1e-2, "batch_size": 4, "max_client_examples": 0,
                   "adapter": adapter,
                   "output": str(tmp_path / "run")})
    simulate(cfg, [ResultsWriter(cfg.output)])
    reported = json.loads((tmp_path / "run" / "results.json").read_text())["final"]
    ws = get_workspace(cfg)
    examples = tmp_path / "examples.json"
    examples.write_text(json.dumps({"prompts": list(ws.splits.test["prompt"]), "responses": list(ws.splits.test["response"]),
                                    "generate": PROMPT, "max_new_tokens": 12}))
    out = subprocess.run([sys.executable, str(LOADER), str(tmp_path / "run" / "model"), str(examples)],
                         capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    plain = json.loads(out.stdout)
    assert plain["fedpeft_imported"] is False
    assert plain["loss"] == pytest.approx(reported["eval_loss"], abs=1e-4)
    config = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(model)
    if adapter == "lora":
        from fedpeft.cli import main

        gen = subprocess.run([sys.executable, "-c", "from fedpeft.cli import run; run()", "generate",
                              str(tmp_path / "run"), PROMPT, "--max-new-tokens", "12"],
                             capture_output=True, text=True, check=False, timeout=300)
        assert gen.returncode == 0, gen.stderr[-2000:]
        assert plain["completion"] and gen.stdout.rstrip("\n") == plain["completion"]
        assert main(["generate", str(tmp_path / "run"), PROMPT, "--max-new-tokens", "0"]) == 2


def test_generate_refuses_a_classifier_export(tmp_path):
    from fedpeft.errors import UsageError
    from fedpeft.generation import generate_run

    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS"}))
    with pytest.raises(UsageError, match="holds a SEQ_CLS model, not a causal LM"):
        generate_run(str(tmp_path / "run"), ["hi"], 8)
