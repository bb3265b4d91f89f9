"""``fedpeft plan --task causal-lm`` is honest: the privacy plan (d, z, R) is the task-independent
one, but there is no time estimate (the cost model's constants were measured on the classification
encoder) and the warnings name the levers a causal LM has, not the classifier's."""

from __future__ import annotations

import json
import math

from fedpeft.cli import main
from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve
from fedpeft.simulation import simulate

#: LoRA r = 8 on the tiny Llama (hidden 32, 4 heads of 8, 2 KV heads, 2 layers): q_proj 32 -> 32
#: has A 8x32 + B 32x8 = 512 coordinates, v_proj 32 -> 16 has 256 + 128 = 384; times 2 layers
TINY_LLAMA_LORA_D = 2 * (8 * 32 + 32 * 8 + 8 * 32 + 16 * 8)


def test_plan_of_a_causal_lm_run_has_no_time_estimate_and_causal_lm_advice(tiny_lm, capsys):
    model, data = tiny_lm
    args = ["plan", "--task", "causal-lm", "--model", str(model), "--dataset", str(data),
            "--clients", "1000", "--epsilon", "2"]
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["trainable_dim"] == TINY_LLAMA_LORA_D == 1792
    assert plan["expected_cohort"] == 5  # the task's default cohort: the planner chose nothing
    assert plan["noise_to_signal"] == \
        plan["noise_multiplier"] * math.sqrt(TINY_LLAMA_LORA_D) / plan["expected_cohort"]
    assert plan["predicted_seconds"] is None and plan["chosen"] == {}
    assert any(n.startswith("no time estimate: the cost model was measured on --task classification") for n in plan["notes"])
    assert any(n.startswith("settings not chosen by the planner") for n in plan["notes"])
    swamp = next(w for w in plan["warnings"] if "swamp" in w)
    assert "held-out loss to rise" in swamp and "--adapter head" not in swamp and "majority-class" not in swamp

    assert main(args) == 0
    text = capsys.readouterr().out
    assert "estimated federation time" not in text and "note: no time estimate" in text


def test_a_causal_lm_run_records_no_time_estimate_in_its_plan(tiny_lm, tmp_path):
    model, data = tiny_lm
    cfg = resolve({"task": "causal-lm", "model": str(model), "dataset": str(data), "backend": "inprocess",
                   "clients": 2, "cohort": 2, "rounds": 1, "output": str(tmp_path / "run")})
    simulate(cfg, [ResultsWriter(cfg.output)])
    utility = json.loads((tmp_path / "run" / "results.json").read_text())["plan"]["utility"]
    assert utility["predicted_seconds"] is None and utility["trainable_dim"] == TINY_LLAMA_LORA_D
    assert utility["notes"] and "no time estimate" in utility["notes"][0]
