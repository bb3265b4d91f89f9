"""How much of FedAvg's aggregation error lies outside Ā's row space (out of reach of any
LoRA-FAIR correction ΔB): hand-built cases, numpy's least squares as the independent reference,
and the per-round metric of the lora-fair strategy through Flower's ``aggregate_train``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.adapters.base import Adapter, AdapterSpec, State
from fedpeft.records import to_record
from fedpeft.strategy import ClientUpdate
from strategies import STRATEGIES
from strategies.lora_math import error_outside_row_space, ideal_update, factor_means, lora_fair_residual

A_BAR = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # r = 2, d_in = 3: row space = span(e1, e2)


@pytest.mark.parametrize("error,share", [
    ([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]], 0.0),    # entirely inside the row space: LoRA-FAIR can remove it
    ([[0.0, 0.0, 5.0], [0.0, 0.0, -1.0]], 1.0),   # entirely outside: no ΔB changes it
    ([[3.0, 0.0, 4.0]], 16.0 / 25.0),             # 4² of 3² + 4² is out of reach
])
def test_hand_built_errors(error, share):
    assert error_outside_row_space(torch.tensor(error), A_BAR) == pytest.approx(share, abs=1e-12)


def test_no_error_has_no_share():
    assert error_outside_row_space(torch.zeros(4, 3), A_BAR) is None


def test_a_rank_deficient_a_bar_spans_only_its_rank():
    a_bar = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]])  # rank 1: span((1, 1, 0))
    # (1, -1, 0) is orthogonal to the row space, (1, 1, 0) inside it
    assert error_outside_row_space(torch.tensor([[1.0, -1.0, 0.0]]), a_bar) == pytest.approx(1.0)
    assert error_outside_row_space(torch.tensor([[2.0, 2.0, 0.0]]), a_bar) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_share_is_the_least_squares_floor_numpy_finds(seed):
    """min over ΔB of ‖E − ΔB Ā‖² / ‖E‖², by numpy's lstsq (an independent solver)."""
    rng = np.random.default_rng(seed)
    a_bar, error = rng.normal(size=(4, 12)), rng.normal(size=(9, 12))
    # E − ΔB Ā = Eᵀ − Āᵀ ΔBᵀ transposed: lstsq of Āᵀ X = Eᵀ
    _, residual, _, _ = np.linalg.lstsq(a_bar.T, error.T, rcond=None)
    floor = residual.sum() / (error ** 2).sum()
    assert error_outside_row_space(torch.from_numpy(error), torch.from_numpy(a_bar)) == pytest.approx(floor, rel=1e-9)


def test_the_exact_least_squares_correction_reaches_the_floor():
    """The ridge solver with λ = 0 is the least-squares ΔB: its corrected product's squared
    error, relative to FedAvg's, is exactly the share outside the row space."""
    g = torch.Generator().manual_seed(7)
    a_list = [torch.randn(3, 10, generator=g, dtype=torch.float64) for _ in range(4)]
    b_list = [torch.randn(8, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    weights = [1.0, 2.0, 3.0, 4.0]
    solve = lora_fair_residual(a_list, b_list, weights, solver="ridge", lam=0.0)
    delta_w = ideal_update(a_list, b_list, weights)
    a_bar, b_bar = factor_means(a_list, b_list, weights)
    before = float(torch.linalg.matrix_norm(delta_w - b_bar @ a_bar) ** 2)
    after = float(torch.linalg.matrix_norm(delta_w - solve.corrected_b @ a_bar) ** 2)
    assert 0.0 < solve.error_outside_span < 1.0
    assert after / before == pytest.approx(solve.error_outside_span, rel=1e-9)


# -- the per-round metric of the lora-fair strategies -------------------------------------------
class _NoInject(Adapter):
    name = "test"

    def inject(self, model):  # pragma: no cover - never called
        return model


LAYERS = ("enc.0.query", "enc.0.value")
D, R = 12, 3


def _clients(seed: int, shared_a: bool = False) -> tuple[State, list[ClientUpdate]]:
    g = torch.Generator().manual_seed(seed)
    glob: State = {"head.weight": torch.zeros(2, D)}
    for layer in LAYERS:
        glob[f"{layer}.lora_A.default.weight"] = torch.randn(R, D, generator=g) / D ** 0.5
        glob[f"{layer}.lora_B.default.weight"] = torch.zeros(D, R)
    updates = []
    for i, n in enumerate([10, 30, 60]):
        state = {k: v + (0 if shared_a and ".lora_A." in k else torch.randn(v.shape, generator=g) * 0.3)
                 for k, v in glob.items()}
        updates.append(ClientUpdate(node_id=i + 1, client_id=i, num_examples=n, state=state, train_loss=1.0,
                                    bytes_up=0))
    return glob, updates


class _AllNodes:
    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def sample(self, server_round: int) -> list[tuple[int, int]]:
        return [(i, node) for i, node in enumerate(self.nodes)]


def _round_metrics(strategy, glob: State, updates: list[ClientUpdate]) -> dict:
    from fedpeft.federation.round import RoundStrategy
    from fedpeft.pipeline import Pipeline, layout_of

    layout = layout_of(updates[0].state)
    rs = RoundStrategy(strategy, Pipeline([]), _AllNodes(len(updates)), upload_layout=lambda rank: layout)
    messages = list(rs.configure_train(1, to_record(glob), ConfigRecord({"server-round": 1, "round-rank": 0}), grid=None))
    replies = [Message(RecordDict({"arrays": to_record(u.state), "metrics": MetricRecord(
        {"client-id": u.client_id, "num-examples": u.num_examples, "train-loss": 1.0})}), reply_to=m)
        for m, u in zip(messages, updates)]
    return dict(rs.aggregate_train(1, replies)[1])


@pytest.mark.parametrize("solver", ["sgd", "ridge"])
def test_lora_fair_reports_the_mean_share_over_layers(flower_task_identity, solver):
    glob, updates = _clients(seed=3)
    strategy = STRATEGIES.get("lora-fair")(_NoInject(AdapterSpec()), solver=solver, steps=20)
    m = _round_metrics(strategy, glob, updates)
    p = np.array([10, 30, 60]) / 100
    shares = []
    for layer in LAYERS:  # by hand, in numpy: the least-squares floor of each layer
        a = [u.state[f"{layer}.lora_A.default.weight"].double().numpy() for u in updates]
        b = [u.state[f"{layer}.lora_B.default.weight"].double().numpy() for u in updates]
        dw = sum(pi * bi @ ai for pi, ai, bi in zip(p, a, b))
        a_bar, b_bar = sum(pi * ai for pi, ai in zip(p, a)), sum(pi * bi for pi, bi in zip(p, b))
        err = dw - b_bar @ a_bar
        residual = np.linalg.lstsq(a_bar.T, err.T, rcond=None)[1].sum()
        shares.append(residual / (err ** 2).sum())
    assert m["aggregation-error-outside-span"] == pytest.approx(np.mean(shares), rel=1e-6)
    assert "aggregation-error-outside-span" not in _round_metrics(STRATEGIES.get("fedavg")(_NoInject(AdapterSpec())),
                                                                  glob, updates)


def test_clients_sharing_a_leave_fedavg_exact_and_no_share(flower_task_identity):
    glob, updates = _clients(seed=4, shared_a=True)  # Σ p_i B_i A = B̄ A: nothing to correct
    strategy = STRATEGIES.get("lora-fair")(_NoInject(AdapterSpec()), solver="ridge")
    m = _round_metrics(strategy, glob, updates)
    assert m["aggregation-error"] < 1e-6 and "aggregation-error-outside-span" not in m


def test_a_lora_fair_run_records_the_share_per_round_in_rounds_csv(tmp_path, small_csv):
    import csv

    from fedpeft.results import ResultsWriter
    from fedpeft.settings import resolve
    from fedpeft.simulation import simulate

    cfg = resolve({"backend": "inprocess", "dataset": str(small_csv), "clients": 4, "cohort": 4, "rounds": 2,
                   "partition": "dirichlet", "dirichlet_alpha": 0.3, "max_client_examples": 16, "batch_size": 8,
                   "max_test_examples": 32, "strategy": "lora-fair", "fair_solver": "ridge",
                   "output": str(tmp_path / "run")})
    out = simulate(cfg, [ResultsWriter(tmp_path / "run")])
    rows = list(csv.DictReader((tmp_path / "run" / "rounds.csv").open()))
    shares = [float(r["aggregation_error_outside_span"]) for r in rows]
    assert len(shares) == 2 and all(0.0 <= s <= 1.0 for s in shares)
    assert [r.aggregation_error_outside_span for r in out.rounds] == pytest.approx(shares)
