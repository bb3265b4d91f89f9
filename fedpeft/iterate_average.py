"""Exponential moving average of the global model over rounds (``--ema β``).

Under user-level DP every round adds fresh Gaussian noise to the global model, and the
iterates random-walk around the optimum; the model after the last round carries the last
rounds' noise in full. Averaging the iterates (Polyak–Ruppert; as an EMA in De et al. 2022,
"Unlocking High-Accuracy Differentially Private Image Classification through Scale")
averages that noise out. The average only reads the released global models, so under DP it
is post-processing and changes no ε.

The training trajectory is unchanged: clients still receive the last iterate. What is
evaluated and exported is the bias-corrected average

    m_t = β·m_{t−1} + (1 − β)·x_t,   c_t = β·c_{t−1} + (1 − β),   x̄_t = m_t / c_t,

i.e. a weighted mean of x_1..x_t with weights ∝ β^{t−i} (no pull towards the initial model).
A tensor whose shape changes between rounds (FLoRA's stacked adapters, DyLoRA rank changes)
restarts its average from the current value.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.adapters.base import State


class IterateAverage:
    """Bias-corrected EMA of floating-point global states; ``beta = 0`` is the last iterate."""

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA coefficient {beta} outside [0, 1)")
        self.beta = float(beta)
        self._sum: dict[str, torch.Tensor] = {}  # m_k (float64)
        self._weight: dict[str, float] = {}  # c_k

    def update(self, state: State) -> None:
        b = self.beta
        for k, v in state.items():
            x = v.detach().to(torch.float64)
            m = self._sum.get(k)
            if m is None or m.shape != x.shape or not v.is_floating_point():
                self._sum[k], self._weight[k] = (1 - b) * x, 1 - b
            else:
                self._sum[k] = b * m + (1 - b) * x
                self._weight[k] = b * self._weight[k] + (1 - b)
        for k in set(self._sum) - set(state):
            del self._sum[k], self._weight[k]

    def average(self, like: State) -> State:
        """x̄ for every key of ``like`` (its dtypes; keys never averaged are taken from it)."""
        out = {}
        for k, v in like.items():
            m = self._sum.get(k)
            out[k] = (m / self._weight[k]).to(v.dtype) if m is not None and m.shape == v.shape else v
        return out

    def state_dict(self) -> tuple[dict[str, Any], State]:
        """(JSON scalars, tensors) for a checkpoint."""
        return {"beta": self.beta, "weight": dict(self._weight)}, {k: v.clone() for k, v in self._sum.items()}

    def load_state_dict(self, scalars: dict[str, Any], tensors: State) -> None:
        if not scalars:
            return
        self._weight = {k: float(w) for k, w in scalars["weight"].items()}
        self._sum = {k: tensors[k].to(torch.float64) for k in self._weight}
