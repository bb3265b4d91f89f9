"""FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313; SPEC §1.2): LoRA with ``A`` frozen.

``A`` is drawn from the run seed — the same draw on the server and on every client, since
:func:`~fedpeft.adapters.lora.inject_lora` seeds peft's Kaiming-uniform init — and never
trained, so it never travels. Only ``B`` and the head are trained and uploaded, which halves
the adapter upload and makes FedAvg exact: ``Σ p_i B_i A = (Σ p_i B_i) A``.
"""

from __future__ import annotations

from torch import nn

from fedpeft.adapters.base import Adapter, AdapterSpec, State, lora_factor
from fedpeft.adapters.lora import inject_lora
from fedpeft.adapters.registry import ADAPTERS

def freeze_lora_a(model: nn.Module) -> State:
    """Stop gradients to every ``lora_A`` weight; return copies of them (the shared ``A``)."""
    frozen: State = {}
    for name, param in model.named_parameters():
        if lora_factor(name) == "A":
            param.requires_grad_(False)
            frozen[name] = param.detach().clone()
    return frozen


@ADAPTERS.register("ffa-lora")
class FFALoRA(Adapter):
    """Trainable and uploaded: every ``lora_B`` and the head; ``A`` fixed by ``spec.seed``."""

    name = "ffa-lora"

    def __init__(self, spec: AdapterSpec) -> None:
        super().__init__(spec)
        self._shared_a: State = {}

    def inject(self, model: nn.Module) -> nn.Module:
        s = self.spec
        peft_model = inject_lora(model, s.rank, s.alpha, s.target_modules, s.seed, s.layers, s.task_type)
        self._shared_a = freeze_lora_a(peft_model)
        return peft_model

    def with_frozen_factors(self, state: State) -> State:
        """The state with the seeded, frozen ``A`` of every layer added (needs :meth:`inject`)."""
        if not self._shared_a:
            raise RuntimeError("FFA-LoRA's shared A exists only after inject()")
        return {**self._shared_a, **state}
