"""The privacy-utility planner (SPEC §3.5): what a user-level DP run can learn, before it runs.

The maths and the measured candidates, no IO: :mod:`fedpeft.planning.auto` reads the data and
builds the model to fill a config in.

With d uploaded coordinates, expected cohort qN, clip S and noise multiplier z, the noise on the
mean update has norm ≈ z·S·√d/(qN) while the mean of clipped updates has norm ≤ S, so the
per-round noise-to-signal ratio is ``R = z·√d/(qN)``. Signal accumulates ∝ T and noise ∝ √T:
learning needs roughly ``R < √T``, and ``√T / R`` is the planner's utility score.

``fedpeft plan`` prints the plan without training; ``fedpeft simulate`` prints it before round
1. When a user-level run is given only ``--clients`` and ``--epsilon`` (none of the settings in
:data:`PLANNED_SETTINGS`), :func:`choose_settings` picks the trainable set, cohort and rounds
that maximise ``√T / R`` within a time budget, plus that trainable set's tuned recipe; any of
those flags given explicitly turns the choice off (explicit flags always win).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

#: Settings the planner may choose; giving any of them means "I decide" (no auto-plan).
PLANNED_SETTINGS = ("adapter", "cohort", "rounds", "clip", "lr", "local_epochs", "server_opt", "server_lr",
                    "server_momentum", "ema", "probe_rounds", "probe_lr", "rank", "alpha", "target_modules", "lora_layers", "train_top_k", "batch_size",
                    "noise_multiplier",
                    "adaptive_clip", "strategy", "compression")

@dataclass(frozen=True)
class ModelShape:
    """What the trainable dimension of a candidate depends on."""

    hidden: int
    layers: int
    num_labels: int
    #: LoRA targets per layer (query, value)
    targets: int = 2


@dataclass(frozen=True)
class Candidate:
    """One trainable set the planner may choose, with the client/server recipe measured for it.

    ``measured`` is (test accuracy, √T/R) of that recipe at N = 1000, ε = 2 on the embedded
    default (experiments/README.md, "DP adapters"); a candidate without a measurement is listed
    but never chosen."""

    name: str
    #: the run settings that make this trainable set (adapter, train_top_k, rank)
    settings: dict[str, Any]
    recipe: dict[str, Any]
    measured: tuple[float, float] | None = None
    #: (q, T) the recipe was measured at, when its local schedule only works there (many small
    #: LoRA steps need many rounds); None: the planner searches q and T
    schedule: tuple[float, int] | None = None
    #: (√T/R, test accuracy) points of the same recipe measured over ε at N = 1000 (the
    #: privacy-utility curves, experiments/README.md); the forecast interpolates them
    curve: tuple[tuple[float, float], ...] = ()

    @property
    def cost_key(self) -> str:
        """The :class:`CostModel` entry of its per-example cost (what one visit runs)."""
        top = self.settings.get("train_top_k")
        return "head" if self.settings["adapter"] == "head" else f"top-{top}" if top else "full"

    def dim(self, shape: ModelShape) -> int:
        """d: uploaded coordinates (LoRA factors of the adapted layers + the head)."""
        head = shape.hidden * shape.num_labels + shape.num_labels
        if self.settings["adapter"] == "head":
            return head
        layers = self.settings.get("train_top_k") or shape.layers
        factors = 1 if self.settings["adapter"] == "ffa-lora" else 2  # FFA-LoRA uploads B only
        return layers * shape.targets * factors * self.settings["rank"] * shape.hidden + head

    def predicted_accuracy(self, score: float, num_labels: int) -> float | None:
        """First-order model: the measured gain over chance, scaled down in proportion to a lower
        utility score √T/R than the measurement had (never scaled up: the measurement is the
        ceiling the recipe showed). Chance (1/labels), not the data's majority rate: the
        prediction lands in a DP run's results and must not depend on the data."""
        if self.measured is None:
            return None
        chance = 1.0 / num_labels
        if self.curve:
            return _interpolate(sorted(self.curve), score, chance)
        accuracy, ref_score = self.measured
        return chance + (accuracy - chance) * min(1.0, score / ref_score)


def _interpolate(points: list[tuple[float, float]], score: float, chance: float) -> float:
    """Accuracy at ``score`` on a measured (score, accuracy) curve: linear in log score between
    points; beyond the largest, its accuracy (no extrapolated gain); below the smallest, its
    gain over chance scaled down in proportion (as :meth:`Candidate.predicted_accuracy`)."""
    lo_s, lo_a = points[0]
    if score <= lo_s:
        return chance + (lo_a - chance) * max(score, 0.0) / lo_s
    for (s0, a0), (s1, a1) in zip(points, points[1:]):
        if score <= s1:
            return a0 + (a1 - a0) * math.log(score / s0) / math.log(s1 / s0)
    return points[-1][1]


#: What the planner chooses among, each with its measured recipe. head: measured on this machine
#: at N = 1000, ε = 2 (seeds 0-2, 1,281 test examples): AdamW lr 0.03 × 5 local epochs gives
#: client updates of norm ≈ 8, so clip 5 keeps their direction; FedAdam (η 0.1) takes steps
#: whose size does not depend on S. Its ceiling is the linear probe's (0.757); the top-k LoRA
#: candidates change the encoder's top layers on the cached bottom (issue #23).
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("head", {"adapter": "head"},
              {"lr": 0.03, "local_epochs": 5, "clip": 5.0, "server_opt": "fedadam", "server_lr": 0.1},
              measured=(0.750, 16.7),
              # dp_utility_head (3 seeds each): ε 0.5, 1, 2, 4, 8 at q = 1, T = 5 (√T/R from the
              # RDP calibration of each ε)
              curve=((4.61, 0.720), (8.60, 0.740), (16.6, 0.752), (30.8, 0.760), (56.3, 0.755))),
    # LoRA r4 (scale alpha/r = 2, as the non-private default) on layer 5 of 6, on the cached
    # bottom: many small steps (AdamW 3e-3 x 2 local epochs, plain FedAvg, clip 1) over 50 rounds
    # of 10% cohorts; measured 0.732 ± 0.007 at eps 2 (3 secret-noise runs, sqrt(T)/R = 4.49;
    # non-private twin 0.779, 1 run), ~6 min per run on the process pool (experiments/README.md, §7)
    Candidate("lora top-1 r4", {"adapter": "lora", "train_top_k": 1, "rank": 4, "alpha": 8.0},
              {"lr": 0.003, "local_epochs": 2, "clip": 1.0, "server_opt": "none", "eval_every": 10},
              measured=(0.732, 4.49), schedule=(0.1, 50),
              # dp_utility_topk (3 seeds each) + dp_adapters_topk at eps 2: eps 0.5, 1, 2, 4, 8
              curve=((1.361, 0.583), (2.592, 0.686), (4.443, 0.732), (6.911, 0.759), (9.895, 0.762))),
)
RECIPES: dict[str, dict[str, Any]] = {c.name: c.recipe for c in CANDIDATES}

#: Candidate sampling rates and round counts of the search.
SAMPLE_RATES = (0.05, 0.1, 0.2, 0.5, 1.0)
ROUNDS = (5, 10, 20)
#: Default wall-time budget of a planned run's federation (seconds, 2-core machine).
TIME_BUDGET_S = 180.0
#: Budget when the user names the adapter (``--adapter lora --epsilon 2``): encoder-changing
#: adapters cost more per visit than the head on cached features.
ADAPTER_TIME_BUDGET_S = 600.0


@dataclass(frozen=True)
class CostModel:
    """Seconds on the 2-core build machine (Ray backend, 2 workers), measured: a head-only run
    of 5 rounds × 1000 clients took 107 s of federation time (≈ 0.02 s per client visit);
    a LoRA r8 client step on batch 8 ≈ 0.4 s (≈ 0.05 s per example and epoch). The process
    pool (the default backend on one machine since 2026-11-30) and padding-free batches are
    faster, so on it these are upper bounds; the constants are kept so that a plan does not
    change with the backend."""

    per_client_visit_s: float = 0.02
    #: keyed by what a visit runs (:attr:`Candidate.cost_key`): the head on cached features, the
    #: top k layers on the cached bottom (measured: benchmarks/results/bottom_cache.json), the full encoder
    per_example_epoch_s: dict[str, float] = field(
        default_factory=lambda: {"head": 2e-5, "top-1": 5e-3, "top-2": 9e-3})
    default_example_epoch_s: float = 0.05
    workers: int = 2

    def seconds(self, adapter: str, cohort: float, rounds: int, examples_per_round: float,
                local_epochs: int) -> float:
        per_example = self.per_example_epoch_s.get(adapter, self.default_example_epoch_s)
        per_round = cohort * self.per_client_visit_s + examples_per_round * local_epochs * per_example / self.workers
        return rounds * per_round

    def basis(self, adapter: str) -> str:
        """What :meth:`seconds` is: an estimate from fixed constants, not a measurement of this run."""
        per_example = self.per_example_epoch_s.get(adapter, self.default_example_epoch_s)
        return (f"estimate = rounds x (qN x {self.per_client_visit_s:g} s per client visit + examples per round "
                f"x local epochs x {per_example:g} s ({adapter}) / {self.workers} workers); constants measured "
                "on 2 cores (visit and head: Ray backend; top-k: benchmark 10, in-process under load; the "
                "process pool is faster); start-up and a cold cache's one-time encoder pass are not included")


#: the warning's words for a classification run whose noise swamps the signal (tasks say their own)
SWAMPED = ("expect majority-class accuracy; lower d (--adapter head, --rank 1), raise --cohort, or drop the flags "
           "you set and let the planner choose")


def noise_to_signal(noise_multiplier: float, dim: int, expected_cohort: float) -> float:
    """``R = z·√d/(qN)`` (SPEC §3.5)."""
    return float(noise_multiplier) * math.sqrt(dim) / float(expected_cohort)


@dataclass
class Plan:
    clients: int
    expected_cohort: float
    sample_rate: float
    rounds: int
    adapter: str
    trainable_dim: int
    dp_level: str
    examples_per_round: float | None = None  # not published under DP (it is the data's size)
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    accountant: str | None = None
    clip: float | None = None
    noise_to_signal: float | None = None
    utility_score: float | None = None  # √T / R
    predicted_seconds: float | None = None
    chosen: dict[str, str] = field(default_factory=dict)  # setting -> why the planner chose it
    #: what one client visit runs, for the time estimate (CostModel key: head, top-k, or the adapter)
    cost_key: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: warnings that state the data's size (not published under DP, like examples_per_round)
    data_warnings: list[str] = field(default_factory=list)
    #: what the plan does not cover (e.g. no time estimate for a task the cost model was not measured on)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"trainable dimension d = {self.trainable_dim:,} ({self.adapter}); expected cohort qN = "
               f"{self.expected_cohort:g} (q = {self.sample_rate:.4g}) of {self.clients} clients; "
               f"{self.rounds} rounds"
               + (f"; ~{self.examples_per_round:,.0f} examples per round" if self.examples_per_round else "")]
        if self.noise_multiplier is not None:
            out.append(f"z = {self.noise_multiplier:.4f} for ε = {self.epsilon} at δ = {self.delta:.3g} "
                       f"({self.accountant}); noise-to-signal per round R = z·√d/(qN) = "
                       f"{self.noise_to_signal:.3g} (learning needs R < √T = {math.sqrt(self.rounds):.2f})")
        if self.predicted_seconds is not None:  # withheld from a DP run's results: it scales with the data
            out.append(f"estimated federation time ~{self.predicted_seconds:.0f} s "
                       f"({CostModel().basis(self.cost_key or self.adapter)})")
        out += [f"planner chose {k}: {why}" for k, why in self.chosen.items()]
        out += [f"note: {n}" for n in self.notes]
        out += [f"warning: {w}" for w in (*self.warnings, *self.data_warnings)]
        return out


def _search_z(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """z to a coarser ε tolerance (0.05) than a run's own calibration: only for ranking."""
    from opacus.accountants.utils import get_noise_multiplier

    from fedpeft.privacy.accounting import ACCOUNTANTS

    cls = ACCOUNTANTS.get(accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' order-range notes while bisecting
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=cls.opacus_class().mechanism(),
                                          epsilon_tolerance=0.05, **cls.epsilon_kwargs()))


def parse_planned(planned: str) -> dict[str, str]:
    """``RunConfig.planned`` (JSON) as setting -> reason."""
    return dict(json.loads(planned)) if planned else {}


def make_plan(*, clients: int, cohort: float, rounds: int, adapter: str, dim: int, train_examples: int,
              dp: str, epsilon: float | None, delta: float | None, noise_multiplier: float | None,
              accountant: str, clip: float | None, local_epochs: int,
              chosen: dict[str, str] | None = None, costs: CostModel | None = None,
              cost_key: str | None = None, timed: bool = True, swamped: str | None = None) -> Plan:
    """The plan of one configuration (``noise_multiplier`` already calibrated for user level).
    ``timed=False``: no time estimate (the cost model was not measured on the run's task);
    ``swamped``: the task's words for a run whose noise swamps the signal."""
    costs = costs or CostModel()
    q = cohort / clients
    plan = Plan(clients=clients, expected_cohort=float(cohort), sample_rate=q, rounds=rounds, adapter=adapter,
                trainable_dim=dim, examples_per_round=q * train_examples, dp_level=dp, chosen=dict(chosen or {}),
                cost_key=cost_key or adapter,
                predicted_seconds=costs.seconds(cost_key or adapter, cohort, rounds, q * train_examples, local_epochs)
                if timed else None)
    if train_examples < clients:
        plan.data_warnings.append(f"{train_examples:,} examples for {clients:,} clients: at least "
                             f"{clients - train_examples:,} clients have no data and send empty (zero) updates")
    if dp == "user" and noise_multiplier is not None:
        plan.epsilon, plan.delta, plan.noise_multiplier = epsilon, delta, noise_multiplier
        plan.accountant, plan.clip = accountant, clip
        plan.noise_to_signal = noise_to_signal(noise_multiplier, dim, cohort)
        plan.utility_score = math.sqrt(rounds) / plan.noise_to_signal
        if plan.noise_to_signal >= math.sqrt(rounds):
            plan.warnings.append(
                f"R = {plan.noise_to_signal:.3g} ≥ √T = {math.sqrt(rounds):.2f}: the noise is predicted to swamp "
                f"the signal ({swamped or SWAMPED})")
    return plan


def _best_rate_and_rounds(cand: Candidate, dim: int, clients: int, epsilon: float, delta: float,
                          accountant: str, train_examples: int, budget_s: float,
                          costs: CostModel) -> tuple[float, float, int, int, float] | None:
    """(score √T/R, estimated seconds, cohort, T, R) of the (q, T) that maximise √T/R for
    ``cand`` within ``budget_s`` (within 2% of the best score the cheaper run wins), or None."""
    options: list[tuple[float, float, int, int, float]] = []
    grid = [cand.schedule] if cand.schedule else [(q, t) for q in SAMPLE_RATES for t in ROUNDS]
    for q, t in grid:
        cohort = max(1, round(q * clients))
        seconds = costs.seconds(cand.cost_key, cohort, t, cohort / clients * train_examples,
                                cand.recipe["local_epochs"])
        if seconds > budget_s:
            continue
        try:
            z = _search_z(epsilon, delta, cohort / clients, t, accountant)
        except ValueError:  # Opacus: the budget is too low for this (q, T)
            continue
        r = noise_to_signal(z, dim, cohort)
        options.append((math.sqrt(t) / r, seconds, cohort, t, r))
    if not options:
        return None
    top = max(o[0] for o in options)
    return min((o for o in options if o[0] >= top / 1.02), key=lambda o: o[1])


def choose_settings(clients: int, epsilon: float, delta: float, accountant: str, train_examples: int,
                    shape: ModelShape, budget_s: float = TIME_BUDGET_S, costs: CostModel | None = None,
                    candidates: tuple[Candidate, ...] = CANDIDATES) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings for a run given only N and ε: for every candidate with a measured recipe, the
    (q, T) maximising √T/R within ``budget_s``; then the candidate with the highest predicted
    accuracy (:meth:`Candidate.predicted_accuracy`; within 0.005 of the best, the cheaper run).

    Returns (settings, why) — ``why`` maps each chosen setting to a one-line reason.
    """
    costs = costs or CostModel()
    scored = []  # (predicted accuracy, seconds, candidate, dim, (score, seconds, cohort, T, R))
    for cand in candidates:
        dim = cand.dim(shape)
        best = _best_rate_and_rounds(cand, dim, clients, epsilon, delta, accountant, train_examples, budget_s, costs)
        if best is None or cand.measured is None:
            continue
        scored.append((cand.predicted_accuracy(best[0], shape.num_labels), best[1], cand, dim, best))
    if not scored:
        raise ValueError(f"no planned setting fits the {budget_s:.0f} s budget")
    top = max(s[0] for s in scored)
    predicted, _, cand, dim, (score, _, cohort, rounds, r) = min(
        (s for s in scored if s[0] >= top - 0.005), key=lambda s: s[1])
    # the others by name and d only: which of them fit the time budget depends on the data's size,
    # which a DP run does not publish (config.planned lands in results.json)
    others = ", ".join(f"{c.name} (d = {c.dim(shape):,})" for c in candidates if c is not cand and c.measured)
    unmeasured = [c.name for c in candidates if c.measured is None]
    measured_acc, measured_score = cand.measured  # type: ignore[misc]
    why = {
        "adapter": f"{cand.name} (d = {dim:,}): highest forecast accuracy {predicted:.3f} (measured "
                   f"{measured_acc:.3f} at N = 1000, ε = 2 with √T/R = {measured_score:.3g}; here √T/R = "
                   f"{score:.3g}" + (f", read off its curve measured at {len(cand.curve)} ε" if cand.curve else "")
                   + ")" + (f"; forecast lower or over the time budget: {others}" if others else "")
                   + (f"; not measured, so not chosen: {', '.join(unmeasured)}" if unmeasured else ""),
        # no time quoted: the estimate scales with the training-set size, which a DP run does not
        # publish (config.planned lands in results.json); `fedpeft plan` prints it with its basis
        "cohort": f"{cohort} (q = {cohort / clients:.3g}): with rounds {rounds}, maximises √T/R = {score:.3g} "
                  f"(R = {r:.3g}) among the settings whose estimated federation time fits a {budget_s:.0f} s "
                  "budget (a linear cost model, not a measurement: `fedpeft plan` prints the estimate)",
        "rounds": f"{rounds}: see cohort",
        **{k: f"{v} ({cand.name} recipe, measured at N = 1000, ε = 2)" for k, v in cand.recipe.items()},
    }
    settings = {k: v for k, v in cand.settings.items()}
    return {**settings, "cohort": cohort, "rounds": rounds, **cand.recipe}, why


def config_plan(cfg: Any, layout: dict[str, tuple[int, ...]], train_examples: int,
                delta: float | None, noise_multiplier: float | None) -> Plan:
    """The plan of a resolved RunConfig whose clients upload ``layout`` (d = its size)."""
    from fedpeft.data.synthetic import WARNING as SYNTHETIC_WARNING, is_synthetic

    # the top layers on the cached bottom cost per visit what --train-top-k k costs (CostModel "top-k")
    top = len(cfg.lora_layer_list) if cfg.lora_layer_list and cfg.bottom_cache else 0
    cost_key = "head" if cfg.adapter == "head" else f"top-{top}" if f"top-{top}" in CostModel().per_example_epoch_s \
        else cfg.adapter
    from fedpeft.tasks import get_task

    task = get_task(cfg.task)
    plan = make_plan(clients=cfg.clients, cohort=cfg.cohort, rounds=cfg.rounds, adapter=cfg.adapter, cost_key=cost_key,
                     dim=sum(math.prod(s) for s in layout.values()), train_examples=train_examples,
                     dp=cfg.dp or "none", epsilon=cfg.epsilon, delta=delta, noise_multiplier=noise_multiplier,
                     accountant=cfg.accountant, clip=cfg.clip, local_epochs=cfg.local_epochs,
                     chosen=parse_planned(cfg.planned), timed=task.cost_measured, swamped=task.swamped)
    if not task.cost_measured:
        plan.notes.append(f"no time estimate: the cost model was measured on --task classification's encoder, not "
                          f"on --task {cfg.task}'s model")
    if not task.planned and cfg.dp == "user":
        plan.notes.append(f"settings not chosen by the planner: its candidates were measured on --task "
                          f"classification; these are --task {cfg.task}'s defaults and your flags")
    if is_synthetic(cfg.dataset):
        plan.warnings.append(SYNTHETIC_WARNING)
    return plan


__all__ = ["ADAPTER_TIME_BUDGET_S", "CANDIDATES", "Candidate", "CostModel", "ModelShape", "PLANNED_SETTINGS", "Plan",
           "RECIPES", "TIME_BUDGET_S", "choose_settings", "config_plan", "make_plan", "noise_to_signal",
           "parse_planned"]
