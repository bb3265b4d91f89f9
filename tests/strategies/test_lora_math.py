"""LoRA-FAIR residual solvers and FLoRA stacking (SPEC §2.2, §2.4, §5) against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.flora import fold_stacked_update
from strategies.lora_math import (
    factor_means,
    ideal_update,
    lora_fair_objective,
    lora_fair_residual,
    solve_residual_ridge,
    solve_residual_sgd,
    stack_lora_factors,
)

D_OUT, D_IN, R = 24, 20, 4
WEIGHTS = [1.0, 2.0, 3.0, 6.0]


def _np_cos(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel(), y.ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def _clients_sharing_a_row_space(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``A_i = C_i Q``: every client's A spans the rows of one Q, so ``ΔW = Σ p_i B_i A_i``
    lies in the row space of ``Ā = (Σ p_i C_i) Q`` and an exact ``ΔB`` exists."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, D_IN, generator=g, dtype=torch.float64)
    a_list = [torch.randn(R, R, generator=g, dtype=torch.float64) @ q for _ in WEIGHTS]
    b_list = [torch.randn(D_OUT, R, generator=g, dtype=torch.float64) for _ in WEIGHTS]
    return a_list, b_list


def _random_clients(seed: int, scale_b: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    a_list = [torch.randn(R, D_IN, generator=g, dtype=torch.float64) for _ in WEIGHTS]
    b_list = [scale_b * torch.randn(D_OUT, R, generator=g, dtype=torch.float64) for _ in WEIGHTS]
    return a_list, b_list


def _np_problem(a_list, b_list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent numpy ``(ΔW, Ā, B̄)``."""
    p = np.asarray(WEIGHTS) / sum(WEIGHTS)
    a_np, b_np = [a.numpy() for a in a_list], [b.numpy() for b in b_list]
    dw = sum(pi * b @ a for pi, a, b in zip(p, a_np, b_np))
    return dw, sum(pi * a for pi, a in zip(p, a_np)), sum(pi * b for pi, b in zip(p, b_np))


# -- LoRA-FAIR ---------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["sgd", "ridge"])
def test_lora_fair_reaches_cosine_one_when_an_exact_residual_exists(solver):
    a_list, b_list = _clients_sharing_a_row_space(seed=1)
    res = lora_fair_residual(a_list, b_list, WEIGHTS, solver=solver, lam=0.0)
    dw, a_bar, b_bar = _np_problem(a_list, b_list)
    assert _np_cos(dw, b_bar @ a_bar) < 0.95  # FedAvg is visibly off: the test is not trivial
    sent = res.corrected_b.numpy() @ a_bar
    assert _np_cos(dw, sent) > 0.999
    assert res.cosine_after == pytest.approx(_np_cos(dw, sent), abs=1e-12)
    if solver == "ridge":  # least squares also gets the scale right: exact product
        np.testing.assert_allclose(sent, dw, atol=1e-9 * np.abs(dw).max())


@pytest.mark.parametrize("seed", [0, 3])
def test_sgd_reaches_the_best_cosine_attainable_in_the_row_space_of_a_bar(seed):
    # for any ΔB, (B̄ + ΔB)Ā has its rows in rowspace(Ā); the best cosine to ΔW over that
    # subspace is the cosine between ΔW and its orthogonal projection onto it
    a_list, b_list = _random_clients(seed)
    dw, a_bar, _ = _np_problem(a_list, b_list)
    projection = dw @ np.linalg.pinv(a_bar) @ a_bar
    best = _np_cos(dw, projection)
    res = lora_fair_residual(a_list, b_list, WEIGHTS, solver="sgd", lam=0.0)
    assert res.cosine_before < best - 0.01
    assert res.cosine_after == pytest.approx(best, abs=1e-4)


@pytest.mark.parametrize("scale_b", [1e-4, 1.0, 1e3])
def test_sgd_is_insensitive_to_the_magnitude_of_the_factors(scale_b):
    # LoRA's B is ~1e-4 early and ~1 late; with λ = 0 the cosine objective is scale-free,
    # so the solver must reach the same cosine at every scale (its lr is relative)
    a_list, b_list = _clients_sharing_a_row_space(seed=2)
    res = lora_fair_residual(a_list, [scale_b * b for b in b_list], WEIGHTS, solver="sgd", lam=0.0)
    assert res.cosine_after > 0.999


def test_sgd_beats_independent_candidate_points_on_the_paper_objective():
    # two points computed without the solver: ΔB = 0 (FedAvg) and the least-squares residual
    # (best cosine, but a large ‖ΔB‖); the minimizer must do at least as well as both
    a_list, b_list = _random_clients(seed=4)
    dw, a_bar, b_bar = (torch.from_numpy(x) for x in _np_problem(a_list, b_list))
    lstsq = torch.from_numpy(np.linalg.lstsq(a_bar.numpy().T, (dw - b_bar @ a_bar).numpy().T, rcond=None)[0].T)
    for lam in (0.0, 0.001, 0.01):
        solution = lora_fair_objective(solve_residual_sgd(a_bar, b_bar, dw, lam=lam), a_bar, b_bar, dw, lam)
        at_zero = lora_fair_objective(torch.zeros_like(b_bar), a_bar, b_bar, dw, lam)
        at_lstsq = lora_fair_objective(lstsq, a_bar, b_bar, dw, lam)
        assert float(solution) < float(at_zero) - 1e-2
        assert float(solution) <= float(at_lstsq) + 1e-6


@pytest.mark.parametrize("lam", [0.01, 0.03])
def test_sgd_solution_is_a_stationary_point_of_the_paper_objective(lam):
    # the solver descends a reduced form (whitened, product never formed); the gradient of the
    # direct SPEC §2.2 formula, by autograd, must vanish at its answer (ΔB ≠ 0, so smooth there)
    a_list, b_list = _random_clients(seed=5)
    dw, a_bar, b_bar = (torch.from_numpy(x) for x in _np_problem(a_list, b_list))

    def grad(delta_b: torch.Tensor) -> torch.Tensor:
        delta_b = delta_b.clone().requires_grad_(True)
        lora_fair_objective(delta_b, a_bar, b_bar, dw, lam).backward()
        return delta_b.grad

    solution = solve_residual_sgd(a_bar, b_bar, dw, lam=lam)
    assert float(solution.norm()) > 0.5
    assert float(grad(solution).norm()) < 1e-3 * float(grad(torch.full_like(b_bar, 1e-9)).norm())


@pytest.mark.parametrize(("solver", "lams"), [
    # λ is in different units: next to 1 − cos ∈ [0, 2] for sgd, next to ĀĀᵀ for ridge
    ("sgd", [0.0, 0.001, 0.01, 1.0]),
    ("ridge", [0.0, 1.0, 10.0, 1000.0]),
])
def test_residual_norm_shrinks_as_lambda_grows(solver, lams):
    a_list, b_list = _random_clients(seed=5)
    norms = [float(lora_fair_residual(a_list, b_list, WEIGHTS, solver=solver, lam=lam).delta_b.norm())
             for lam in lams]
    assert norms[0] > 0.1
    assert all(later < earlier for earlier, later in zip(norms, norms[1:])), norms
    assert norms[-1] < 0.1 * norms[0], norms


@pytest.mark.parametrize("lam", [0.01, 0.5])
def test_ridge_matches_numpy_solve(lam):
    a_list, b_list = _random_clients(seed=6)
    dw, a_bar, b_bar = _np_problem(a_list, b_list)
    expected = (dw - b_bar @ a_bar) @ a_bar.T @ np.linalg.inv(a_bar @ a_bar.T + lam * np.eye(R))
    got = solve_residual_ridge(torch.from_numpy(a_bar), torch.from_numpy(b_bar), torch.from_numpy(dw), lam)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_ridge_without_regularization_is_the_least_squares_solution_even_for_rank_deficient_a():
    a_list, b_list = _random_clients(seed=7)
    dw, a_bar, b_bar = _np_problem(a_list, b_list)
    a_bar[-1] = a_bar[0]  # rank r-1: ĀĀᵀ is singular, the solver must not blow up
    residual = dw - b_bar @ a_bar
    # min-norm X with X Ā ≈ R  <=>  Āᵀ Xᵀ ≈ Rᵀ
    expected = np.linalg.lstsq(a_bar.T, residual.T, rcond=None)[0].T
    got = solve_residual_ridge(torch.from_numpy(a_bar), torch.from_numpy(b_bar), torch.from_numpy(dw), 0.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-9)


def test_ideal_update_and_means_match_numpy():
    a_list, b_list = _random_clients(seed=8)
    dw, a_bar, b_bar = _np_problem(a_list, b_list)
    got_a, got_b = factor_means(a_list, b_list, WEIGHTS)
    np.testing.assert_allclose(ideal_update(a_list, b_list, WEIGHTS).numpy(), dw, rtol=1e-12)
    np.testing.assert_allclose(got_a.numpy(), a_bar, rtol=1e-12)
    np.testing.assert_allclose(got_b.numpy(), b_bar, rtol=1e-12)


def test_degenerate_layer_with_all_b_zero_gets_no_residual():
    a_list, b_list = _random_clients(seed=9, scale_b=0.0)
    for solver in ("sgd", "ridge"):
        res = lora_fair_residual(a_list, b_list, WEIGHTS, solver=solver)
        assert torch.count_nonzero(res.delta_b) == 0


def test_unknown_solver_is_rejected():
    a_list, b_list = _random_clients(seed=0)
    with pytest.raises(ValueError, match="solver"):
        lora_fair_residual(a_list, b_list, WEIGHTS, solver="newton")


# -- FLoRA stacking ---------------------------------------------------------------------------
def _heterogeneous(seed: int, ranks=(2, 3, 5)) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    a_list = [torch.randn(r, D_IN, generator=g) for r in ranks]  # float32 on purpose
    b_list = [torch.randn(D_OUT, r, generator=g) for r in ranks]
    return a_list, b_list


def test_stacked_product_equals_weighted_sum_of_client_products_with_heterogeneous_ranks():
    a_list, b_list = _heterogeneous(seed=10)
    weights, scales = [5.0, 1.0, 2.0], [16 / 2, 16 / 3, 16 / 5]  # alpha / r_i
    a_stack, b_stack = stack_lora_factors(a_list, b_list, weights, scales)
    assert a_stack.shape == (2 + 3 + 5, D_IN) and b_stack.shape == (D_OUT, 2 + 3 + 5)
    p = np.asarray(weights) / sum(weights)
    expected = sum(pi * si * b.double().numpy() @ a.double().numpy()
                   for pi, si, a, b in zip(p, scales, a_list, b_list))
    np.testing.assert_allclose((b_stack @ a_stack).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_fold_adds_the_exact_stacked_update_to_the_base_weight():
    a_list, b_list = _heterogeneous(seed=11, ranks=(1, 4))
    w0 = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(12))
    folded = fold_stacked_update(w0, a_list, b_list, [1.0, 3.0])
    expected = w0.double().numpy() + 0.25 * b_list[0].double().numpy() @ a_list[0].double().numpy() \
        + 0.75 * b_list[1].double().numpy() @ a_list[1].double().numpy()
    assert folded.dtype == w0.dtype
    np.testing.assert_allclose(folded.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_stacking_rejects_mismatched_layer_shapes():
    a_list, b_list = _heterogeneous(seed=13, ranks=(2, 2))
    a_list[1] = torch.randn(2, D_IN + 1)
    with pytest.raises(ValueError):
        stack_lora_factors(a_list, b_list, [1.0, 1.0])
