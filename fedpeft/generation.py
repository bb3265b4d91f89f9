"""``fedpeft generate``: a completion from a ``--task causal-lm`` run's exported model.

The model is loaded the way its README says (transformers + peft: the base, then the adapter
from ``<run>/model/``); the prompt goes through the exported tokenizer's chat template with the
assistant's generation prompt, exactly the prompt part the run trained on
(:func:`fedpeft.data.chat.prompt_text`). Decoding is greedy, so the same run and prompt give
the same text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from fedpeft.errors import UsageError
from fedpeft.inference import ADAPTER_CONFIG, model_dir_of
from fedpeft.model.loading import quiet_transformers

#: ``fedpeft generate --max-new-tokens`` bounds
MAX_NEW_TOKENS = 2048


def load_causal_export(model_dir: Path):  # noqa: ANN201 - (peft model, tokenizer)
    """The exported causal LM (eval mode) and its tokenizer; one-line errors for a classifier
    export or a base that cannot be loaded."""
    quiet_transformers()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpeft.causal_lm_export import TASK_TYPE, loadable_causal_base

    settings = json.loads((model_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if settings.get("task_type") != TASK_TYPE:
        raise UsageError(f"{str(model_dir)!r} holds a {settings.get('task_type')} model, not a causal LM; "
                         "fedpeft generate needs a --task causal-lm run (classifiers: fedpeft predict)")
    base = settings.get("base_model_name_or_path") or ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(loadable_causal_base(base), dtype=torch.float32), str(model_dir))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"the base model {base!r} named in {model_dir / ADAPTER_CONFIG} with this adapter cannot "
                         f"be loaded ({first})") from None
    return model.eval(), tokenizer


@torch.inference_mode()
def complete(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64) -> list[str]:  # noqa: ANN001
    """The greedy completion of each prompt (chat template applied), special tokens dropped."""
    from fedpeft.data.chat import prompt_text

    out = []
    for prompt in prompts:
        enc = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def generate_run(run: str, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """``fedpeft generate``: completions of ``prompts`` by the run's exported model."""
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UsageError("no prompt to complete; give one or more non-blank prompts after the run directory")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens {max_new_tokens} is invalid; allowed: an integer in 1..{MAX_NEW_TOKENS}")
    model, tokenizer = load_causal_export(model_dir_of(run))
    return complete(model, tokenizer, prompts, max_new_tokens)


__all__ = ["complete", "generate_run", "load_causal_export"]
