"""LoRA (Hu et al. 2021) through peft: A (Kaiming-uniform) and B (zeros), both trained
and uploaded, plus the classification head (SPEC §1.1)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedpeft.adapters.base import Adapter
from fedpeft.adapters.registry import ADAPTERS


def inject_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], seed: int) -> nn.Module:
    """peft LoRA on ``targets`` with a seeded init; the head goes to ``modules_to_save``."""
    config = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=list(targets), bias="none")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


@ADAPTERS.register("lora")
class LoRA(Adapter):
    name = "lora"

    def inject(self, model: nn.Module) -> nn.Module:
        s = self.spec
        return inject_lora(model, s.rank, s.alpha, s.target_modules, s.seed)
