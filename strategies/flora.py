"""FLoRA (SPEC §2.4; Wang et al., NeurIPS 2024, arXiv 2409.05976): exact aggregation by stacking.

FedAvg of LoRA factors sends ``B̄Ā`` instead of the clients' mean product (SPEC §1.1). FLoRA
stacks the factors instead (:func:`strategies.lora_math.stack_lora_factors`):
``B_stack A_stack = Σ p_i s B_i A_i`` exactly, whatever each client's rank. The stacked
adapter has rank ``Σ r_i``, so the server folds its product into the frozen base weight of
every adapted layer (``W ← W + B_stack A_stack``) and every client restarts the next round
from a fresh LoRA (the run's initial ``A`` and ``B = 0``).

How it fits the state interface: the global state of a FLoRA run also carries the folded
weight of every adapted layer under peft's name ``<layer>.base_layer.weight``. The broadcast
therefore holds dense ``d_out x d_in`` tensors (``bytes_down`` counts them: FLoRA's download
is dense, as in the paper), clients and the server's evaluation model load them like any
other tensor, and uploads stay the small LoRA factors plus the head (FedAvg-averaged).

The reported aggregation error compares the effective weights
``W_new + s B_fresh A_fresh`` with ``W_old + Σ p_i s B_i A_i``; it is not exactly 0 only
because the folded weight is stored in float32.

Heterogeneous ranks (``--client-ranks 2,4,8``): client ``i`` trains a rank-``r_i`` LoRA (the
components beyond ``r_i`` are held at 0, :meth:`fedpeft.adapters.base.Adapter.limit_rank`)
and uploads only ``A[:r_i]`` and ``B[:, :r_i]``; the stack has rank ``Σ r_i`` and the fold is
still exact. All clients share the model's scale ``alpha / r`` (a rank-``r_i`` client is a
truncation of the rank-``r`` adapter, not a separately scaled one).

Limits: the fold needs one fixed LoRA scale, so
DyLoRA adapters (scale ``alpha / b``) are refused; it needs each client's own factors, so
user-level central DP is refused (``needs_individual_updates``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpeft.adapters.base import State, base_weight_key, lora_factor
from fedpeft.config import RunConfig
from fedpeft.aggregation import normalized_weights, weighted_mean
from fedpeft.strategy import ClientUpdate, FedPeftStrategy, stack_uploads
from strategies.lora_math import stack_lora_factors
from fedpeft.strategy import STRATEGIES

base_key = base_weight_key  # where the layer's stacked product is folded


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


def _is_factor(key: str) -> bool:  # a LoRA factor: folded into the base, not averaged
    return lora_factor(key) is not None


@STRATEGIES.register("flora")
class Flora(FedPeftStrategy):
    name = "flora"
    needs_individual_updates = True
    heterogeneous_ranks = True
    supports_server_optimizer = False  # clients restart from a fresh LoRA every round

    @classmethod
    def refusal(cls, cfg: RunConfig) -> str | None:
        from fedpeft.adapters import ADAPTERS

        if not ADAPTERS.get(cfg.adapter).fixed_scale:
            return (f"--strategy flora folds scale·B·A into the base weights and needs a fixed LoRA "
                    f"scale, but --adapter {cfg.adapter} scales by alpha/b with a varying rank b; "
                    "allowed adapters: lora, ffa-lora")
        return None

    def initial_global(self, initial: State, frozen_base: State) -> State:
        self._fresh = {k: v.clone() for k, v in initial.items()}
        full = self.adapter.with_frozen_factors(initial)
        missing = [base_key(a) for a, _ in self.adapter.lora_pairs(set(full))
                   if base_key(a) not in frozen_base]
        if missing:
            raise ValueError(f"flora: no frozen base weight for {missing[0]} (peft LoRA layers expected)")
        folded = {base_key(a): frozen_base[base_key(a)].clone()
                  for a, _ in self.adapter.lora_pairs(set(full))}
        return {**initial, **folded}

    def _fresh_state(self) -> State:
        """The LoRA every client restarts from (the run's initial factors)."""
        fresh = getattr(self, "_fresh", None)
        if fresh is None:  # the server calls it at start, also when resuming
            raise RuntimeError("flora: initial_global() must run before aggregate()")
        return fresh

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  round_rank: int | None = None) -> State:
        states, weights = stack_uploads(updates)
        fresh = self._fresh_state()
        shared = [{k: v for k, v in st.items() if not _is_factor(k)} for st in states]
        new = self.adapter.merge(global_state, weighted_mean(shared, weights), None)
        scale = self.adapter.lora_scale
        full_fresh = self.adapter.with_frozen_factors(fresh)
        views = [self.adapter.with_frozen_factors(self.adapter.client_view(global_state, s))
                 for s in states]
        for a_key, b_key in self.adapter.lora_pairs(set(views[0])):
            w_key = base_key(a_key)
            # clients started from the fresh pair, so their own update is s(B_i A_i − B_0 A_0)
            start = scale * (full_fresh[b_key].double() @ full_fresh[a_key].double())
            folded = fold_stacked_update(global_state[w_key].double(), [v[a_key] for v in views],
                                         [v[b_key] for v in views], weights, [scale] * len(views))
            new[w_key] = (folded - start).to(global_state[w_key].dtype)
            for key in (a_key, b_key):
                if key in new:  # FFA-LoRA's frozen A is not in the state
                    new[key] = fresh[key].clone()
        return new

    def aggregation_error(self, global_state: State, updates: Sequence[ClientUpdate],
                          new_global: State) -> float | None:
        """Mean over layers of ``‖(W_new + sB'A') − (W_old + Σ p_i s B_i A_i)‖ / ‖Σ p_i s(B_i A_i − B_0 A_0)‖``."""
        scale = self.adapter.lora_scale
        p = normalized_weights([u.num_examples for u in updates])
        views = [self.adapter.with_frozen_factors(self.adapter.client_view(global_state, u.state))
                 for u in updates]
        sent = self.adapter.with_frozen_factors(new_global)
        start = self.adapter.with_frozen_factors(global_state)
        errors = []
        for a_key, b_key in self.adapter.lora_pairs(set(sent)):
            w_key = base_key(a_key)
            before = start[w_key].double() + scale * start[b_key].double() @ start[a_key].double()
            ideal = start[w_key].double() + sum(
                p_i * scale * (v[b_key].double() @ v[a_key].double()) for p_i, v in zip(p, views))
            after = sent[w_key].double() + scale * sent[b_key].double() @ sent[a_key].double()
            denom = float(torch.linalg.matrix_norm(ideal - before))
            errors.append(0.0 if denom == 0.0 else float(torch.linalg.matrix_norm(after - ideal)) / denom)
        return sum(errors) / len(errors) if errors else None
