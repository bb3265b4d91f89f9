"""LoRA-FAIR (SPEC §2.2; Bian et al., ICCV 2025, arXiv 2411.14961; no official code).

FedAvg of LoRA factors sends ``B̄Ā``, not the clients' mean update ``ΔW = Σ p_i B_i A_i``
(SPEC §1.1). LoRA-FAIR keeps ``Ā`` and sends ``B̄ + ΔB*`` instead of ``B̄``, where ``ΔB*``
is a small residual that makes ``(B̄ + ΔB*) Ā`` point along ``ΔW`` (math in
:mod:`strategies.lora_math`). Every other uploaded tensor (classifier head, ...) is the plain
FedAvg mean. Next round every client starts from ``(Ā, B̄ + ΔB*)``; the aggregation error the
base class logs is measured against exactly that sent state, so the correction shows up there.
Every round also records how much of FedAvg's error lies outside ``Ā``'s row space, which no
``ΔB`` can reach (``aggregation_error_outside_span`` in rounds.csv).

The server needs each client's own factors, so the strategy declares
``needs_individual_updates``: it cannot sit behind secure aggregation or user-level central
DP noise (the user-dp pipeline stage combines the cohort, so the run is refused). Under sample-level DP-SGD it is
post-processing and allowed.

Options are constructor keywords (:meth:`LoraFair.from_config` passes ``--fair-solver`` and
``--fair-lambda``): ``solver`` ``"sgd"``
(paper: Adam descent on the cosine objective) or ``"ridge"`` (closed-form least squares),
``lam`` (λ, 0.01), ``steps`` (300, sgd only), ``lr`` (relative step size, sgd only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from fedpeft.config import RunConfig
from fedpeft.adapters.base import Adapter, State
from fedpeft.aggregation import weighted_mean
from fedpeft.strategy import ClientUpdate, FedPeftStrategy, stack_uploads
from fedpeft.options import choice, non_negative
from strategies.lora_math import SOLVERS, ResidualSolve, Solver, lora_fair_residual
from fedpeft.strategy import STRATEGIES

#: round metric: the share of FedAvg's aggregation error no LoRA-FAIR correction can reach
AGGREGATION_ERROR_OUTSIDE_SPAN = "aggregation-error-outside-span"


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the setting.

    The per-layer solves work on ``d x r`` tensors, far too small to gain from threads, and
    each of the hundreds of tiny ops then pays the thread pool's wake-up/spin cost; on a
    loaded 2-core machine we measured the same 12-layer sgd solve at 1.5 s on one thread
    and 27-114 s on two. The server's round loop is single-threaded while it aggregates.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@STRATEGIES.register("lora-fair")
class LoraFair(FedPeftStrategy):
    name = "lora-fair"
    needs_individual_updates = True
    options = (choice("fair_solver", *SOLVERS), non_negative("fair_lambda"))

    @classmethod
    def from_config(cls, adapter: Adapter, cfg: RunConfig) -> LoraFair:
        return cls(adapter, solver=cfg.fair_solver, lam=cfg.fair_lambda)

    def __init__(self, adapter: Adapter, *, solver: Solver = "sgd",
                 lam: float = 0.01, steps: int = 300, lr: float = 0.05) -> None:
        super().__init__(adapter)
        if solver not in SOLVERS:
            raise ValueError(f"unknown LoRA-FAIR solver {solver!r}; allowed: {', '.join(SOLVERS)}")
        if lam < 0 or steps < 0 or lr <= 0:
            raise ValueError(f"LoRA-FAIR needs lam >= 0, steps >= 0, lr > 0; got {lam}, {steps}, {lr}")
        self.solver: Solver = solver
        self.lam = float(lam)
        self.steps = int(steps)
        self.lr = float(lr)
        #: Per-layer results of the last :meth:`aggregate` (B key -> solve), for diagnostics.
        self.last_solves: dict[str, ResidualSolve] = {}

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  round_rank: int | None = None) -> State:
        states, weights = stack_uploads(updates)
        new = self.adapter.merge(global_state, weighted_mean(states, weights), round_rank)
        uploaded = set().union(*(u.state for u in updates))
        views = [self.adapter.client_view(global_state, u.state) for u in updates]
        self.last_solves = {}
        with _single_threaded():
            for a_key, b_key in self.adapter.lora_pairs(set(new)):
                if a_key not in uploaded and b_key not in uploaded:
                    continue  # layer not trained this round: every client holds the global pair
                solve = lora_fair_residual(
                    [v[a_key] for v in views], [v[b_key] for v in views], weights,
                    solver=self.solver, lam=self.lam, steps=self.steps, lr=self.lr)
                new[b_key] = solve.corrected_b.to(new[b_key].dtype)
                self.last_solves[b_key] = solve
        return new

    def aggregation_metrics(self) -> dict[str, float]:
        """``aggregation-error-outside-span``: per layer, the share of FedAvg's squared error
        ``‖ΔW − B̄Ā‖²`` outside Ā's row space, i.e. out of reach of any ``ΔB``
        (:func:`strategies.lora_math.error_outside_row_space`), averaged over the layers where
        FedAvg was inexact. It bounds what this strategy can gain over FedAvg: near 1, no
        solver or λ can bring ``(B̄+ΔB)Ā`` much closer to ``ΔW`` than ``B̄Ā``."""
        shares = [s.error_outside_span for s in self.last_solves.values() if s.error_outside_span is not None]
        return {AGGREGATION_ERROR_OUTSIDE_SPAN: sum(shares) / len(shares)} if shares else {}
