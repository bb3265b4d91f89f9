"""Pure tensor math over per-layer LoRA factors, shared by LoRA-aware strategies.

Everything here works on one adapted layer at a time: client factors ``A_i (r_i x d_in)``,
``B_i (d_out x r_i)`` and aggregation weights ``p_i`` (normalized here). The LoRA scale
``s = alpha / r`` is left out: it multiplies ``ΔW`` and every product alike, so it cancels in
cosine similarities and in the relative aggregation error (SPEC §1.1). Computation is in
float64; callers cast back to their storage dtype.

* :func:`ideal_update` — ``ΔW = Σ p_i B_i A_i``, what the server would like to send.
* :func:`lora_fair_residual` — LoRA-FAIR's residual ``ΔB*`` (SPEC §2.2, Bian et al.,
  ICCV 2025, arXiv 2411.14961) by iterative descent (``"sgd"``, the paper's method) or by the
  closed-form ridge variant (``"ridge"``).
* :func:`error_outside_row_space` — the share of FedAvg's aggregation error that no
  correction of ``B̄`` can remove (it lies outside the row space of ``Ā``).
* :func:`stack_lora_factors` — FLoRA stacking (SPEC §2.4, Wang et al. 2024,
  arXiv 2409.05976): exact, heterogeneous ranks allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedpeft.aggregation import normalized_weights

Solver = Literal["sgd", "ridge"]
SOLVERS: tuple[str, ...] = ("sgd", "ridge")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _check_pairs(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                 weights: Sequence[float]) -> None:
    if not a_list:
        raise ValueError("no client factors given")
    if not (len(a_list) == len(b_list) == len(weights)):
        raise ValueError(f"got {len(a_list)} A, {len(b_list)} B and {len(weights)} weights")
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"client {i}: B {tuple(b.shape)} @ A {tuple(a.shape)} is not a LoRA pair")


def ideal_update(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                 weights: Sequence[float]) -> torch.Tensor:
    """``ΔW = Σ p_i B_i A_i`` (float64) — the average of the client updates (SPEC §1.1)."""
    _check_pairs(a_list, b_list, weights)
    p = normalized_weights(weights)
    return sum(p_i * (_f64(b) @ _f64(a)) for p_i, a, b in zip(p, a_list, b_list))


def factor_means(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                 weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ā, B̄) = (Σ p_i A_i, Σ p_i B_i)`` (float64): what FedAvg sends (SPEC §2.1)."""
    _check_pairs(a_list, b_list, weights)
    p = normalized_weights(weights)
    a_bar = sum(p_i * _f64(a) for p_i, a in zip(p, a_list))
    b_bar = sum(p_i * _f64(b) for p_i, b in zip(p, b_list))
    return a_bar, b_bar


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the flattened matrices (0 if either is zero)."""
    x, y = x.reshape(-1), y.reshape(-1)
    denom = torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)
    if float(denom.detach()) == 0.0:
        return torch.zeros((), dtype=x.dtype)
    return torch.dot(x, y) / denom


def lora_fair_objective(delta_b: torch.Tensor, a_bar: torch.Tensor, b_bar: torch.Tensor,
                        delta_w: torch.Tensor, lam: float) -> torch.Tensor:
    """SPEC §2.2: ``S(ΔW, (B̄ + ΔB) Ā) + λ ‖ΔB‖_F`` with ``S = 1 − cos``. Differentiable."""
    return 1.0 - cosine_similarity(delta_w, (b_bar + delta_b) @ a_bar) \
        + lam * torch.linalg.matrix_norm(delta_b)


def solve_residual_ridge(a_bar: torch.Tensor, b_bar: torch.Tensor, delta_w: torch.Tensor,
                         lam: float) -> torch.Tensor:
    """Closed-form ridge residual ``ΔB = (ΔW − B̄Ā) Āᵀ (Ā Āᵀ + λI)⁻¹`` (SPEC §2.2 option).

    This minimizes ``‖(B̄ + ΔB) Ā − ΔW‖_F² + λ ‖ΔB‖_F²`` — a least-squares surrogate of the
    paper's cosine objective (it also matches the scale of ``ΔW``, which cosine ignores).
    With ``λ = 0`` it uses the pseudo-inverse, so a rank-deficient ``Ā`` gives the
    minimum-norm least-squares solution instead of failing.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    a, b, w = _f64(a_bar), _f64(b_bar), _f64(delta_w)
    residual = w - b @ a
    if lam == 0:
        return residual @ torch.linalg.pinv(a)
    gram = a @ a.T + lam * torch.eye(a.shape[0], dtype=torch.float64)
    # ΔB G = R Āᵀ  with G symmetric  <=>  G ΔBᵀ = Ā Rᵀ
    return torch.linalg.solve(gram, a @ residual.T).T


def _inverse_sqrt_psd(gram: torch.Tensor) -> torch.Tensor:
    """``G^(-1/2)`` on the range of a symmetric PSD ``G`` (0 on its numerical null space)."""
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > evals.max().clamp(min=0.0) * gram.shape[0] * torch.finfo(gram.dtype).eps
    inv_sqrt = torch.where(keep, evals.clamp(min=torch.finfo(gram.dtype).tiny).rsqrt(),
                           torch.zeros_like(evals))
    return (evecs * inv_sqrt) @ evecs.T


def solve_residual_sgd(a_bar: torch.Tensor, b_bar: torch.Tensor, delta_w: torch.Tensor,
                       lam: float = 0.01, steps: int = 300, lr: float = 0.05) -> torch.Tensor:
    """The paper's solver: ``steps`` Adam steps on the LoRA-FAIR objective from ``ΔB = 0``.

    The objective is exactly SPEC §2.2's (:func:`lora_fair_objective`, in ΔB); only the
    coordinates the descent moves in are changed, so that a fixed ``lr`` and a few hundred
    steps work for every layer and round:

    * whitening: ``ΔB = c · Z · (Ā Āᵀ)^(-1/2)``. Then ``ΔB Ā = c · Z · U`` with ``U``
      having orthonormal rows, so the cosine term is equally well conditioned in every
      direction of ``Z`` however ill-conditioned ``Ā`` is (plain Adam on ΔB stalled at
      cos ≈ 0.95 on such layers in our tests). Directions of the null space of ``Ā Āᵀ``
      do not change the product and only cost ``λ‖ΔB‖``, so they are left at 0.
    * scale: ``c = ‖ΔW‖_F / sqrt(d_out · r)``, the entry size of a ``Z`` that reproduces
      ``ΔW``. LoRA's B entries range from 1e-6 to 1 across rounds and Adam's step is ``lr``
      in parameter units, so ``lr`` is relative: the per-step change of ``Z`` is about
      ``lr``, whatever the magnitude of the factors.

    ``lr`` decays on a cosine schedule to 0 so the iterates settle instead of oscillating,
    and the best iterate seen is returned (``ΔB = 0`` included, so the result never scores
    worse than FedAvg's ``B̄`` on the objective). Deterministic (no randomness; float64 on
    CPU). Degenerate layers (``ΔW = 0`` or ``Ā = 0``: cosine undefined) return ``ΔB = 0``.
    """
    if lam < 0 or steps < 0 or lr <= 0:
        raise ValueError(f"need lam >= 0, steps >= 0, lr > 0; got {lam}, {steps}, {lr}")
    a, b, w = _f64(a_bar), _f64(b_bar), _f64(delta_w)
    zero = torch.zeros_like(b)
    norm_w, norm_a = float(torch.linalg.matrix_norm(w)), float(torch.linalg.matrix_norm(a))
    if norm_w == 0.0 or norm_a == 0.0 or steps == 0:
        return zero
    # Never form the d_out x d_in product: with C = B̄ + ΔB,
    #   <ΔW, C Ā> = <ΔW Āᵀ, C>   and   ‖C Ā‖_F² = <C (Ā Āᵀ), C>,
    # so a step costs O(d_out r²) instead of O(d_out r d_in). Same objective value.
    w_at = w @ a.T
    gram = a @ a.T
    precondition = (norm_w / math.sqrt(b.numel())) * _inverse_sqrt_psd(gram)

    def objective(z: torch.Tensor) -> torch.Tensor:
        delta_b = z @ precondition
        corrected = b + delta_b
        norm_m = torch.sqrt(torch.clamp(((corrected @ gram) * corrected).sum(), min=0.0))
        cos = (w_at * corrected).sum() / (norm_w * norm_m) if float(norm_m.detach()) > 0 \
            else torch.zeros((), dtype=torch.float64)
        return 1.0 - cos + lam * torch.linalg.matrix_norm(delta_b)

    z = torch.zeros_like(b, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)))
    best_loss, best_z = math.inf, z.detach().clone()
    with torch.enable_grad():
        for _ in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = objective(z)
            # ‖ΔB‖ is not smooth at 0, so Adam may end next to a better earlier iterate
            if float(loss.detach()) < best_loss:
                best_loss, best_z = float(loss.detach()), z.detach().clone()
            if sched.last_epoch >= steps:
                break
            loss.backward()
            opt.step()
            sched.step()
    return best_z @ precondition


def error_outside_row_space(error: torch.Tensor, a_bar: torch.Tensor) -> float | None:
    """Share of ``‖E‖_F²`` outside the row space of ``Ā``: ``‖E (I − P)‖_F² / ‖E‖_F²`` with
    ``P = Ā⁺Ā`` the orthogonal projector onto that row space (None when ``E = 0``).

    LoRA-FAIR (SPEC §2.2) keeps ``Ā`` and sends ``(B̄ + ΔB) Ā``: whatever ``ΔB``, the change
    ``ΔB Ā`` has its rows in ``Ā``'s row space. With ``E = ΔW − B̄Ā`` FedAvg's aggregation error
    (SPEC §1.1), ``min_ΔB ‖E − ΔB Ā‖_F² = ‖E (I − P)‖_F²`` (Pythagoras), so this share is the
    part of FedAvg's squared error out of reach of any correction, whatever its solver or λ:
    1 means LoRA-FAIR cannot improve on FedAvg's product at all, 0 that it could make it exact.
    Its square root is the lowest relative error ``‖ΔW − (B̄+ΔB)Ā‖ / ‖ΔW − B̄Ā‖`` reachable.

    The row space is spanned by the right singular vectors of ``Ā`` whose singular values exceed
    ``σ_max · max(r, d_in) · eps`` (numpy's ``matrix_rank`` tolerance), so a rank-deficient ``Ā``
    (e.g. identical client ``A`` rows) is handled.
    """
    e, a = _f64(error), _f64(a_bar)
    if e.dim() != 2 or a.dim() != 2 or e.shape[1] != a.shape[1]:
        raise ValueError(f"error {tuple(e.shape)} and Ā {tuple(a.shape)} must share d_in (columns)")
    total = float(torch.linalg.matrix_norm(e) ** 2)
    if total == 0.0:
        return None
    _, sigma, vh = torch.linalg.svd(a, full_matrices=False)
    top = float(sigma.max()) if sigma.numel() else 0.0
    basis = vh[sigma > top * max(a.shape) * torch.finfo(torch.float64).eps] if top > 0 else vh[:0]
    outside = e - (e @ basis.T) @ basis
    return min(1.0, float(torch.linalg.matrix_norm(outside) ** 2) / total)


@dataclass(frozen=True)
class ResidualSolve:
    """One layer's LoRA-FAIR result and how much it improved the sent product."""

    delta_b: torch.Tensor  # ΔB* (float64, d_out x r)
    corrected_b: torch.Tensor  # B̄ + ΔB* (float64): what the server sends instead of B̄
    a_bar: torch.Tensor  # Ā (float64)
    cosine_before: float  # cos(ΔW, B̄Ā)      — FedAvg
    cosine_after: float  # cos(ΔW, (B̄+ΔB*)Ā) — LoRA-FAIR
    #: share of FedAvg's squared error ``‖ΔW − B̄Ā‖²`` outside Ā's row space, which no ΔB
    #: reaches (:func:`error_outside_row_space`); None when FedAvg's product is exact
    error_outside_span: float | None = None


def lora_fair_residual(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                       weights: Sequence[float], *, solver: Solver = "sgd", lam: float = 0.01,
                       steps: int = 300, lr: float = 0.05) -> ResidualSolve:
    """LoRA-FAIR for one layer (SPEC §2.2): keep ``Ā``, correct ``B̄`` by ``ΔB*``."""
    delta_w = ideal_update(a_list, b_list, weights)
    a_bar, b_bar = factor_means(a_list, b_list, weights)
    if solver == "sgd":
        delta_b = solve_residual_sgd(a_bar, b_bar, delta_w, lam, steps, lr)
    elif solver == "ridge":
        delta_b = solve_residual_ridge(a_bar, b_bar, delta_w, lam)
    else:
        raise ValueError(f"unknown LoRA-FAIR solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    corrected = b_bar + delta_b
    return ResidualSolve(
        delta_b=delta_b, corrected_b=corrected, a_bar=a_bar,
        cosine_before=float(cosine_similarity(delta_w, b_bar @ a_bar)),
        cosine_after=float(cosine_similarity(delta_w, corrected @ a_bar)),
        error_outside_span=_share_outside_span(delta_w, b_bar, a_bar),
    )


#: FedAvg's error below this fraction of ‖ΔW‖ is float round-off (clients sharing A make
#: ``Σ p_i B_i A − B̄A`` exactly 0 in exact arithmetic): its direction means nothing
_ROUND_OFF = 1e-12


def _share_outside_span(delta_w: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor) -> float | None:
    """:func:`error_outside_row_space` of FedAvg's error ``ΔW − B̄Ā``; None when it is exact."""
    error = delta_w - b_bar @ a_bar
    if float(torch.linalg.matrix_norm(error)) <= _ROUND_OFF * float(torch.linalg.matrix_norm(delta_w)):
        return None
    return error_outside_row_space(error, a_bar)


def stack_lora_factors(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                       weights: Sequence[float],
                       scales: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking (SPEC §2.4): ``A_stack = [p_1 s_1 A_1; …; p_K s_K A_K]`` (rows),
    ``B_stack = [B_1 … B_K]`` (columns), so ``B_stack A_stack = Σ p_i s_i B_i A_i`` exactly.

    Client ranks ``r_i`` may differ (the stack has rank ``Σ r_i``); ``d_in`` and ``d_out``
    must agree. ``scales`` are the per-client LoRA scales ``s_i = alpha_i / r_i``, which
    differ when ranks do; default 1 (scale applied elsewhere). Float64 results.
    """
    _check_pairs(a_list, b_list, weights)
    if len({a.shape[1] for a in a_list}) != 1 or len({b.shape[0] for b in b_list}) != 1:
        raise ValueError("stacked clients must share d_in (A columns) and d_out (B rows)")
    s = [1.0] * len(a_list) if scales is None else [float(x) for x in scales]
    if len(s) != len(a_list):
        raise ValueError(f"got {len(s)} scales for {len(a_list)} clients")
    p = normalized_weights(weights)
    a_stack = torch.cat([p_i * s_i * _f64(a) for p_i, s_i, a in zip(p, s, a_list)], dim=0)
    b_stack = torch.cat([_f64(b) for b in b_list], dim=1)
    return a_stack, b_stack
