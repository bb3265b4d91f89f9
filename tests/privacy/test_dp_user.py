"""fedpeft.stages.user_dp.UserLevelDP: user-level DP-FedAvg as a stage of the update pipeline
in front of a fedpeft strategy (SPEC §3.1), driven through the real Flower Strategy API
(:class:`fedpeft.federation.round.RoundStrategy`) with a fake adapter and replies."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant as GoogleRdp
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedpeft.adapters.base import Adapter, AdapterSpec
from fedpeft.config import RunConfig
from fedpeft.errors import UsageError
from fedpeft.records import from_record, payload_bytes, to_record
from fedpeft.federation.round import RoundStrategy
from fedpeft.pipeline import Pipeline, layout_of, refusals
from fedpeft.privacy.randomness import SecretStreams, SeededStreams
from fedpeft.privacy.accounting import RDP_ORDERS, make_accountant
from fedpeft.privacy.adaptive_clipping import AdaptiveClipConfig, update_noise_multiplier
from fedpeft.stages.user_dp import UserLevelDP
from strategies.fedavg import FedAvg

#: Message() outside a Flower runtime needs a task identity (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("flower_task_identity")

A, B = "enc.0.query.lora_A.default.weight", "enc.0.query.lora_B.default.weight"
HEAD = "classifier.weight"


class FakeAdapter(Adapter):
    name = "fake"

    def inject(self, model):  # never called: no model in these tests
        raise NotImplementedError


class FixedSampler:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def sample(self, server_round: int) -> list[tuple[int, int]]:
        """Every node, each its own client (client id = position)."""
        return list(enumerate(self.nodes))


class FairLike(FedAvg):
    """Stands in for LoRA-FAIR: a strategy that must see each client's own factors."""

    name = "fair-like"
    needs_individual_updates = True


def global_state(rank: int = 8, d: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, d, generator=g), B: torch.randn(d, rank, generator=g),
            HEAD: torch.randn(2, d, generator=g)}


def make_stage(z: float = 1.0, clip: float = 1.0, cohort: float = 4.0, q: float = 0.1,
               seed: int | None = 0, **kw) -> UserLevelDP:
    """``seed=None``: the production default (a fresh secret key)."""
    streams = SeededStreams(seed) if seed is not None else None
    return UserLevelDP(noise_multiplier=z, clip=clip, expected_cohort=cohort, sample_rate=q,
                       accountant=make_accountant("rdp"), delta=1e-5, streams=streams, **kw)


def make_dp(nodes: list[int], z: float = 1.0, clip: float = 1.0, cohort: float = 4.0,
            q: float = 0.1, seed: int | None = 0, layout: dict | None = None, **kw) -> RoundStrategy:
    """FedAvg behind the user-dp stage; ``layout``: the honest upload (default: every tensor
    of :func:`global_state`)."""
    layout = layout if layout is not None else layout_of(global_state())
    stage = make_stage(z, clip, cohort, q, seed, **kw)
    return RoundStrategy(FedAvg(FakeAdapter(AdapterSpec())), Pipeline([stage]), FixedSampler(nodes),
                         upload_layout=lambda rank: layout)


def dp_of(rs: RoundStrategy) -> UserLevelDP:
    stage = rs.pipeline.find("user-dp")
    assert isinstance(stage, UserLevelDP)
    return stage


def run_round(dp: RoundStrategy, server_round: int, glob: dict[str, torch.Tensor],
              uploads: list[dict[str, torch.Tensor] | None], rank: int = 0,
              examples: list[int] | None = None, losses: list[float] | None = None):
    """Configure, answer each message with its upload (None: an error reply), aggregate."""
    messages = list(dp.configure_train(server_round, to_record(glob), ConfigRecord({"round-rank": rank}),
                                       grid=None))
    assert len(messages) == len(uploads)
    replies = []
    for i, (msg, up) in enumerate(zip(messages, uploads)):
        if up is None:
            replies.append(Message(Error(code=0, reason="client crashed"), reply_to=msg))
            continue
        metrics = MetricRecord({"num-examples": (examples or [10] * len(uploads))[i],
                                "train-loss": (losses or [1.0] * len(uploads))[i], "client-id": i})
        replies.append(Message(RecordDict({"arrays": to_record(up), "metrics": metrics}), reply_to=msg))
    arrays, metrics = dp.aggregate_train(server_round, replies)
    return from_record(arrays), dict(metrics), replies, messages


def shifted(glob, scale: float, seed: int, keys=None, shape_of=None):
    """An upload = global (or its prefix) + a random update of L2 norm ``scale`` overall."""
    g = torch.Generator().manual_seed(seed)
    keys = keys or list(glob)
    deltas = {k: torch.randn((shape_of or {}).get(k, glob[k].shape), generator=g) for k in keys}
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in deltas.values()))
    up = {}
    for k, v in deltas.items():
        base = glob[k][tuple(slice(0, s) for s in v.shape)]
        up[k] = base + v * (scale / norm)
    return up


def test_refuses_a_strategy_that_needs_individual_updates():
    cfg = RunConfig(strategy="fair-like", dp="user", epsilon=1.0)
    reason = refusals(cfg, FairLike)
    assert reason is not None and "fair-like needs every client's individual update" in reason
    assert "user-dp" in reason and "--dp sample" in reason
    assert refusals(RunConfig(strategy="fair-like", dp="sample", epsilon=1.0), FairLike) is None
    assert refusals(cfg, FedAvg) is None


def test_noised_mean_update_has_fixed_denominator_and_noise_std_z_s_over_m():
    glob = global_state(rank=16, d=512)            # 16·512·2 + 2·512 = 17,408 coordinates
    z, clip, m = 1.2, 0.5, 4.0
    dp = make_dp([11, 12, 13], z=z, clip=clip, cohort=m, layout=layout_of(glob))
    uploads = [shifted(glob, 3.0, 1), shifted(glob, 0.2, 2), shifted(glob, 7.0, 3)]
    new, metrics, _, _ = run_round(dp, 1, glob, uploads)
    # independent hand computation of the signal: each Δ scaled to min(1, S/‖Δ‖), sum / m
    signal = {k: sum((u[k] - glob[k]).double() * min(1.0, clip / n)
                     for u, n in zip(uploads, (3.0, 0.2, 7.0))) / m for k in glob}
    resid = torch.cat([(new[k].double() - glob[k].double() - signal[k]).flatten() for k in glob])
    d, sigma = resid.numel(), z * clip / m
    ratio = float(resid.var()) / sigma ** 2
    assert abs(ratio - 1) < 6 * math.sqrt(2 / (d - 1)), ratio
    assert abs(float(resid.mean())) < 6 * sigma / math.sqrt(d)
    assert metrics["fraction-clipped"] == pytest.approx(2 / 3)
    assert metrics["clip-norm"] == clip


def test_metrics_carry_the_base_keys_and_epsilon_matches_an_independent_accountant():
    glob = global_state()
    dp = make_dp([5, 6, 7], z=1.1, q=0.1)
    ups = [shifted(glob, 2.0, 1), None, shifted(glob, 0.1, 2)]
    for rnd in (1, 2):
        _, metrics, replies, _ = run_round(dp, rnd, glob, ups, examples=[10, 0, 30], losses=[2.0, 0, 1.0])
    assert metrics["clients-replied"] == 2 and metrics["clients-failed"] == 1
    assert metrics["bytes-up"] == sum(payload_bytes(r.content["arrays"]) for r in replies if not r.has_error())
    assert metrics["bytes-down"] == payload_bytes(to_record(glob)) * 3
    assert metrics["train-loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)
    assert metrics["num-examples"] == 40
    assert metrics["noise-multiplier"] == 1.1
    assert "aggregation-error" not in metrics
    google = GoogleRdp(orders=list(RDP_ORDERS))
    google.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 2))
    assert metrics["epsilon"] == pytest.approx(google.get_epsilon(1e-5), rel=0.05)
    assert dp_of(dp).accountant.history == [(1.1, 0.1, 2)]


def test_rank_prefix_uploads_touch_only_the_prefix_coordinates():
    glob = global_state(rank=8, d=32)
    shapes = {A: (3, 32), B: (32, 3), HEAD: (2, 32)}   # DP-DyLoRA round rank 3
    dp = make_dp([1, 2], z=1.0, layout=shapes)
    ups = [shifted(glob, 0.5, s, shape_of=shapes) for s in (1, 2)]
    new, _, _, _ = run_round(dp, 1, glob, ups, rank=3)
    assert torch.equal(new[A][3:], glob[A][3:]) and torch.equal(new[B][:, 3:], glob[B][:, 3:])
    assert not torch.equal(new[A][:3], glob[A][:3]) and not torch.equal(new[B][:, :3], glob[B][:, :3])
    assert new[A].shape == glob[A].shape


def test_uploaded_keys_only_are_noised():
    glob = global_state()
    dp = make_dp([1, 2], layout={B: tuple(glob[B].shape), HEAD: tuple(glob[HEAD].shape)})
    ups = [shifted(glob, 0.5, s, keys=[B, HEAD]) for s in (1, 2)]    # FFA-LoRA: A stays frozen
    new, _, _, _ = run_round(dp, 1, glob, ups)
    assert torch.equal(new[A], glob[A])
    assert not torch.equal(new[B], glob[B])


def test_round_without_clients_still_noises_and_is_accounted():
    glob = global_state()
    layout = {B: tuple(glob[B].shape), HEAD: tuple(glob[HEAD].shape)}
    dp = make_dp([], z=1.0, clip=2.0, cohort=5.0, layout=layout)
    new, metrics, _, messages = run_round(dp, 1, glob, [])
    assert messages == []
    assert dp_of(dp).accountant.steps == 1 and metrics["epsilon"] > 0
    assert torch.equal(new[A], glob[A])
    noise = (new[B].double() - glob[B].double()).flatten()
    assert float(noise.abs().max()) > 0
    assert float(noise.std()) == pytest.approx(1.0 * 2.0 / 5.0, rel=0.5)   # 512 draws, loose
    assert metrics["clients-replied"] == 0 and "fraction-clipped" not in metrics


def test_seeded_streams_reproduce_the_noise_other_seeds_do_not():
    glob = global_state()
    ups = [shifted(glob, 0.5, 1)]
    a, _, _, _ = run_round(make_dp([1], seed=3), 4, glob, ups)
    b, _, _, _ = run_round(make_dp([1], seed=3), 4, glob, ups)
    c, _, _, _ = run_round(make_dp([1], seed=4), 4, glob, ups)
    assert all(torch.equal(a[k], b[k]) for k in glob)
    assert not torch.equal(a[B], c[B])


def test_default_noise_is_secret_and_the_seed_does_not_regenerate_it():
    """Two wrappers built the production way draw independent noise; the seeded derivation
    (what anyone holding --seed could compute) does not match either (SPEC §3.4)."""
    glob = global_state()
    ups = [shifted(glob, 0.5, 1)]
    a, _, _, _ = run_round(make_dp([1], seed=None), 4, glob, ups)
    b, _, _, _ = run_round(make_dp([1], seed=None), 4, glob, ups)
    public, _, _, _ = run_round(make_dp([1], seed=0), 4, glob, ups)
    assert not torch.equal(a[B], b[B])
    assert not torch.equal(a[B], public[B]) and not torch.equal(b[B], public[B])


def test_same_key_draws_the_same_noise_within_an_attempt_and_fresh_noise_in_the_next(tmp_path):
    """One streams object (one attempt at the run): same round, same noise. The same key
    loaded again (a resume: a new attempt) draws other noise — a re-run round never reuses
    its noise on other inputs (issue 24, finding 4)."""
    glob = global_state()
    ups = [shifted(glob, 0.5, 1)]
    key = SecretStreams.fresh()
    dps = [make_dp([1], seed=None) for _ in range(2)]
    for dp in dps:
        dp_of(dp).streams = key
    a, _, _, _ = run_round(dps[0], 4, glob, ups)
    b, _, _, _ = run_round(dps[1], 4, glob, ups)
    assert all(torch.equal(a[k], b[k]) for k in glob)
    key.save(tmp_path)
    resumed = make_dp([1], seed=None)
    dp_of(resumed).streams = SecretStreams.load(tmp_path)
    c, _, _, _ = run_round(resumed, 4, glob, ups)
    assert not torch.equal(a[B], c[B])


def test_zero_update_of_an_empty_client_is_summed_like_any_other():
    """A client with no data replies with the broadcast itself (num-examples 0): the DP sum
    counts it as a zero vector, so the result equals the round without it."""
    glob = global_state()
    ups = [shifted(glob, 0.3, 1), {k: v.clone() for k, v in glob.items()}]
    with_empty, m1, _, _ = run_round(make_dp([1, 2], seed=5), 1, glob, ups, examples=[10, 0])
    alone, _, _, _ = run_round(make_dp([1], seed=5), 1, glob, ups[:1])
    assert all(torch.equal(with_empty[k], alone[k]) for k in glob)
    assert m1["clients-replied"] == 2 and m1["rejected"] == 0


def test_nan_update_with_zero_examples_is_rejected_and_counted():
    glob = global_state()
    bad = {k: v.clone() for k, v in glob.items()}
    bad[B][0, 0] = float("nan")
    new, metrics, _, _ = run_round(make_dp([1, 2], seed=5), 1, glob, [shifted(glob, 0.3, 1), bad],
                                   examples=[10, 0])
    assert metrics["rejected"] == 1 and metrics["clients-replied"] == 1
    assert all(bool(torch.isfinite(new[k]).all()) for k in glob)


def test_adaptive_clipping_noises_the_update_with_z_delta_and_accounts_z():
    glob = global_state(rank=16, d=512)
    z, clip, m, count_std = 1.0, 1.0, 3.0, 0.55
    cfg = AdaptiveClipConfig(count_noise_std=count_std)
    z_delta = update_noise_multiplier(z, count_std)          # (1 − 1/1.21)^(−1/2) ≈ 2.40
    assert z_delta == pytest.approx((1 - 1 / 1.21) ** -0.5)
    dp = make_dp([1, 2, 3], z=z, clip=clip, cohort=m, adaptive=cfg, layout=layout_of(glob))
    ups = [shifted(glob, 0.01, s) for s in (1, 2, 3)]          # all far below C
    new, metrics, _, _ = run_round(dp, 1, glob, ups)
    signal = {k: sum((u[k] - glob[k]).double() for u in ups) / m for k in glob}
    resid = torch.cat([(new[k].double() - glob[k].double() - signal[k]).flatten() for k in glob])
    ratio = float(resid.var()) / (z_delta * clip / m) ** 2
    assert abs(ratio - 1) < 6 * math.sqrt(2 / (resid.numel() - 1)), ratio
    stage = dp_of(dp)
    assert stage.accountant.history == [(z, 0.1, 1)]
    # all three below C: b̃ = 1 + N(0, (σ_b/m)²) → C·exp(−0.2(b̃ − 0.5)) (6-sigma band)
    band = 6 * count_std / m * 0.2
    assert math.exp(-0.1 - band) <= stage.clip / clip <= math.exp(-0.1 + band)
    assert stage.clip < clip and metrics["clip-norm"] == clip


def test_adaptive_clipping_refuses_a_count_noise_too_small_for_z():
    with pytest.raises(UsageError, match="count noise"):
        make_stage(z=1.5, cohort=10.0, adaptive=AdaptiveClipConfig())   # 2σ_b = 1 < 1.5


def test_state_dict_round_trip_restores_epsilon_and_clip():
    glob = global_state()
    dp = make_dp([1, 2], adaptive=AdaptiveClipConfig(count_noise_std=1.0))
    for rnd in (1, 2, 3):
        run_round(dp, rnd, glob, [shifted(glob, 5.0, rnd), shifted(glob, 0.1, rnd + 10)])
    restored = make_stage(adaptive=AdaptiveClipConfig(count_noise_std=1.0))
    restored.load_state_dict(json.loads(json.dumps(dp_of(dp).state_dict())))
    assert restored.epsilon() == dp_of(dp).epsilon() > 0
    assert restored.clip == dp_of(dp).clip != 1.0


def test_budget_check_stops_before_the_round_that_would_exceed_it():
    eps = []                                   # ε after 4 and 5 rounds, by Google's RDP
    for k in (4, 5):
        google = GoogleRdp(orders=list(RDP_ORDERS))
        google.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.5)), k))
        eps.append(google.get_epsilon(1e-5))
    target = (eps[0] + eps[1]) / 2             # allows exactly 4 rounds
    dp = make_stage(z=1.5, q=0.1)
    rounds = 0
    while not dp.exceeds_budget_next_round(target):
        dp.accountant.step(dp.noise_multiplier, dp.sample_rate)
        rounds += 1
    assert rounds == 4 and dp.epsilon() <= target


def test_registered_lora_fair_and_flora_are_refused_and_fedavg_accepted():
    from strategies import STRATEGIES

    for name in ("lora-fair", "flora"):
        reason = refusals(RunConfig(strategy=name, dp="user", epsilon=1.0), STRATEGIES.get(name))
        assert reason is not None and name in reason
    assert refusals(RunConfig(strategy="fedavg", dp="user", epsilon=1.0), STRATEGIES.get("fedavg")) is None
    with pytest.raises(UsageError, match="lora-fair needs every client's individual update"):
        from fedpeft.settings import resolve

        resolve({"strategy": "lora-fair", "epsilon": 2.0})
