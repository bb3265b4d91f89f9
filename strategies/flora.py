"""FLoRA stacking (SPEC §2.4; Wang et al., NeurIPS 2024, arXiv 2409.05976): math only.

NO STRATEGY IS REGISTERED: ``--strategy flora`` does not exist yet, on purpose.

FLoRA aggregates exactly and with heterogeneous client ranks by stacking the factors
(:func:`strategies.lora_math.stack_lora_factors`): ``B_stack A_stack = Σ p_i s_i B_i A_i``.
The stacked adapter has rank ``Σ r_i``, so FLoRA folds its product into the frozen base
weight every round (``W0 ← W0 + B_stack A_stack``, :func:`fold_stacked_update`) and every
client restarts from a fresh LoRA. That cannot be done honestly with today's interfaces:

* the state moved between server and clients holds trainable tensors only (the frozen
  backbone never leaves a process, :mod:`fedpeft.adapters.base`); the strategy never sees
  ``W0`` and cannot broadcast the dense per-layer update ``d_out x d_in`` that clients
  (and the server's evaluation model) would have to add to their base weights;
* ``load_state`` copies values in, it cannot add a delta to a frozen weight;
* clients all train the adapter's single rank; nothing assigns per-client ranks.

What a real FLoRA strategy needs: a broadcast channel for dense base-weight deltas (or
cumulative folded weights) applied additively on clients and on the server's eval model,
a fresh LoRA re-initialisation each round, and per-client ranks. Its download cost is then
dense (``d_out x d_in`` per adapted layer and round), which FLoRA's paper also accepts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strategies.lora_math import stack_lora_factors


def fold_stacked_update(w0: torch.Tensor, a_list: Sequence[torch.Tensor],
                        b_list: Sequence[torch.Tensor], weights: Sequence[float],
                        scales: Sequence[float] | None = None) -> torch.Tensor:
    """FLoRA's per-round server step for one layer: ``W0 + B_stack A_stack`` (``w0``'s dtype).

    ``scales`` are the clients' LoRA scales ``alpha_i / r_i`` (default 1).
    """
    a_stack, b_stack = stack_lora_factors(a_list, b_list, weights, scales)
    if w0.shape != (b_stack.shape[0], a_stack.shape[1]):
        raise ValueError(f"W0 {tuple(w0.shape)} does not match the update "
                         f"{(b_stack.shape[0], a_stack.shape[1])}")
    return (w0.to(torch.float64) + b_stack @ a_stack).to(w0.dtype)
