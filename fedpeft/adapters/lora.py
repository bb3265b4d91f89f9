"""LoRA (Hu et al. 2021) through peft: A (Kaiming-uniform) and B (zeros), both trained
and uploaded, plus the classification head (SPEC §1.1)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedpeft.adapters.base import Adapter
from fedpeft.errors import UsageError
from fedpeft.adapters.registry import ADAPTERS


def inject_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], seed: int,
                layers: tuple[int, ...] = (), task_type: str = "SEQ_CLS") -> nn.Module:
    """peft LoRA on ``targets`` with a seeded init; for ``SEQ_CLS`` the head goes to
    ``modules_to_save`` (a causal LM, ``CAUSAL_LM``, trains the adapter alone).
    ``layers``: only these encoder layers (peft's ``layers_to_transform``; () = all) — fewer
    trainable coordinates, hence less DP noise (SPEC §3.5)."""
    config = LoraConfig(task_type=task_type, r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=list(targets), bias="none",
                        layers_to_transform=list(layers) or None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError:  # peft's NoMatchingPeftModuleError is a ValueError
            layers_note = f" in layers {','.join(map(str, layers))}" if layers else ""
            raise UsageError(f"--target-modules {','.join(targets)!r}{layers_note} matches no module of the "
                             f"model; allowed: names of its linear layers ({', '.join(linear_names(model))}) "
                             f"and layer indices below its layer count") from None


def linear_names(model: nn.Module, limit: int = 12) -> list[str]:
    """The distinct last name parts of the model's weight-matrix layers (what LoRA can target):
    ``query, value, ...`` for BERT, ``q_proj, v_proj, ...`` for Llama, ``c_attn, ...`` for GPT-2."""
    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if name and getattr(getattr(module, "weight", None), "ndim", 0) == 2
                    and not isinstance(module, nn.Embedding)})
    return names[:limit] + (["..."] if len(names) > limit else [])


@ADAPTERS.register("lora")
class LoRA(Adapter):
    name = "lora"

    def inject(self, model: nn.Module) -> nn.Module:
        s = self.spec
        return inject_lora(model, s.rank, s.alpha, s.target_modules, s.seed, s.layers, s.task_type)
