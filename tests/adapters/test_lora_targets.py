"""A --target-modules that matches nothing is refused naming the model's own linear layers."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedpeft.adapters.lora import inject_lora, linear_names
from fedpeft.errors import UsageError


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16))


def _llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=100))


@pytest.mark.parametrize("build, expected", [
    # GPT-2 block: attention c_attn/c_proj, MLP c_fc/c_proj (Conv1D); layer norms are vectors
    (_gpt2, ["c_attn", "c_fc", "c_proj", "lm_head"]),
    # Llama block: q/k/v/o projections and the gated MLP
    (_llama, ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]),
])
def test_the_refusal_names_the_models_own_linear_layers(build, expected):
    assert linear_names(build()) == expected
    with pytest.raises(UsageError) as err:
        inject_lora(build(), 2, 4.0, ("query", "value"), seed=0, task_type="CAUSAL_LM")
    message = str(err.value)
    assert "--target-modules 'query,value' matches no module" in message and "\n" not in message
    assert f"({', '.join(expected)})" in message
