"""Pure tensor math shared by strategies: weighted means and the LoRA aggregation error."""

from __future__ import annotations

from collections.abc import Sequence

import torch

State = dict[str, torch.Tensor]


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """``p_i`` proportional to ``weights`` (example counts), summing to 1."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must have a positive sum")
    return [float(w) / total for w in weights]


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> State:
    """``Σ p_i x_i`` per key (float64 accumulation, cast back to each tensor's dtype)."""
    if not states:
        raise ValueError("no client states to average")
    p = normalized_weights(weights)
    out: State = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for p_i, s in zip(p, states):
            acc += p_i * s[key].to(torch.float64)
        out[key] = acc.to(states[0][key].dtype)
    return out


def lora_aggregation_error(client_states: Sequence[State], weights: Sequence[float],
                           global_state: State, pairs: Sequence[tuple[str, str]]) -> float | None:
    """SPEC §1.1: mean over adapted layers of ``‖Σ p_i B_i A_i − B̄Ā‖_F / ‖Σ p_i B_i A_i‖_F``.

    ``global_state`` holds the factors the server will actually send (for FedAvg the plain
    means; for LoRA-FAIR the corrected ``B̄ + ΔB``). The LoRA scale cancels in the ratio.
    Returns None when there are no LoRA pairs.
    """
    if not pairs:
        return None
    p = normalized_weights(weights)
    errors = []
    for a_key, b_key in pairs:
        ideal = sum(p_i * (s[b_key].double() @ s[a_key].double()) for p_i, s in zip(p, client_states))
        sent = global_state[b_key].double() @ global_state[a_key].double()
        denom = torch.linalg.matrix_norm(ideal)
        if float(denom) == 0.0:
            errors.append(0.0)  # all clients still at B = 0: nothing to mis-aggregate
            continue
        errors.append(float(torch.linalg.matrix_norm(ideal - sent) / denom))
    return sum(errors) / len(errors)
