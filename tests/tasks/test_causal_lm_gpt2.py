"""``--task causal-lm`` on a GPT-2 model: the LoRA targets follow the model's type (peft's
defaults: GPT-2's attention is one fused ``c_attn`` Conv1D, Llama's ``q_proj``/``v_proj``),
training runs and the export reproduces the run with plain peft. The GPT-2 is randomly
initialised (hidden 32, 2 layers) with the tiny Llama's tokenizer and chat template: no download."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.errors import UsageError
from fedpeft.engine.checkpoint import load_checkpoint
from fedpeft.engine.workspace import get_workspace
from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve
from fedpeft.simulation import simulate

LOADER = Path(__file__).with_name("plain_causal_lm_loader.py")


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_lm, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_lm[0])
    tok.save_pretrained(str(out))
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(out))
    return out


def _settings(model, data, **kw):
    return {"task": "causal-lm", "model": str(model), "dataset": str(data), "backend": "inprocess", "clients": 3,
            "cohort": 3, "rounds": 2, "lr": 1e-2, "local_epochs": 2, "batch_size": 4, "max_client_examples": 0, **kw}


def test_the_default_targets_follow_the_model_type(tiny_lm, tiny_gpt2, monkeypatch):
    model, data = tiny_lm
    assert resolve(_settings(tiny_gpt2, data)).target_modules == "c_attn"
    assert resolve(_settings(model, data)).target_modules == "q_proj,v_proj"
    # what the user names wins
    assert resolve(_settings(tiny_gpt2, data, target_modules="c_proj")).target_modules == "c_proj"
    assert resolve(_settings(model, data, target_modules="auto")).target_modules == "q_proj,v_proj"
    # the embedded SmolLM2 (a Llama) is not converted from its GGUF just to validate settings
    import fedpeft.model.causal_lm as causal_lm

    monkeypatch.setattr(causal_lm, "converted_dir", lambda name: pytest.fail("converted to read its type"))
    assert resolve({"task": "causal-lm"}).target_modules == "q_proj,v_proj"


def test_a_model_type_peft_has_no_targets_for_is_refused_in_one_line(tiny_lm, tmp_path):
    from transformers import OlmoConfig

    OlmoConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               vocab_size=400).save_pretrained(str(tmp_path / "olmo"))
    with pytest.raises(UsageError) as err:
        resolve(_settings(tmp_path / "olmo", tiny_lm[1]))
    assert str(err.value) == (f"--target-modules auto: peft has no default LoRA targets for --model "
                              f"{str(tmp_path / 'olmo')!r} (model type 'olmo'); allowed: --target-modules naming its "
                              "attention projections, e.g. q_proj,v_proj")
    # with the targets named, the settings are accepted
    assert resolve(_settings(tmp_path / "olmo", tiny_lm[1], target_modules="q_proj,v_proj")).model.endswith("olmo")


def test_two_rounds_on_gpt2_train_c_attn_and_export_for_plain_peft(tiny_lm, tiny_gpt2, tmp_path):
    cfg = resolve(_settings(tiny_gpt2, tiny_lm[1], output=str(tmp_path / "run"), checkpoint_every=2))
    out = simulate(cfg, [ResultsWriter(cfg.output)])
    ws = get_workspace(cfg)
    # every uploaded tensor is a LoRA factor of a c_attn Conv1D, in each of the 2 blocks
    assert {k.split(".h.")[1].split(".lora_")[0] for k in ws.initial_state} == {"0.attn.c_attn", "1.attn.c_attn"}
    trained = load_checkpoint(tmp_path / "run").global_state
    ws.adapter.load_state(ws.model, ws.initial_state)
    before = ws.task.evaluate(ws.model, ws.train, ws.pad_id).loss
    ws.adapter.load_state(ws.model, trained)
    after = ws.task.evaluate(ws.model, ws.train, ws.pad_id).loss
    assert after < before - 0.1, (before, after)
    # plain transformers + peft (no fedpeft import) load the export and reproduce the eval loss
    examples = tmp_path / "examples.json"
    examples.write_text(json.dumps({"prompts": list(ws.splits.test["prompt"]),
                                    "responses": list(ws.splits.test["response"]),
                                    "generate": "What is two plus three?", "max_new_tokens": 4}))
    plain = subprocess.run([sys.executable, str(LOADER), str(tmp_path / "run" / "model"), str(examples)],
                           capture_output=True, text=True, check=False, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    result = json.loads(plain.stdout)
    assert result["fedpeft_imported"] is False
    assert result["loss"] == pytest.approx(out.final.eval_loss, abs=1e-4)
    assert json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]
