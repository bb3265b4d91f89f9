"""Per-client privacy accounting for sample-level DP-SGD (SPEC §3.2, §4 "compact storage").

A client's accountant must persist across ALL rounds it trains in — a fresh accountant per
round silently resets ε. Clients are hosted by whichever worker the engine picks, so the
history cannot live in process memory: each client has one small JSON file,
``<state dir>/accountants/<client id>.json``, holding :meth:`Accountant.state_dict` (the
accountant's name and its run-length-merged event history — a few bytes per client,
written only for clients that have trained).

Also here: the per-client noise calibration. With ``--epsilon`` every client calibrates its
own z for the worst case that it is sampled in every round, so no client can exceed the
target whatever the server's sampling does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedpeft.atomic import atomic_write_text
from fedpeft.client_files import client_file
from fedpeft.errors import UsageError
from fedpeft.privacy.accounting import Accountant, make_accountant
from fedpeft.privacy.calibration import noise_multiplier_for


class ClientAccountantStore:
    """Load/save one :class:`Accountant` per client id under ``root`` (atomic writes)."""

    def __init__(self, root: Path | str, accountant: str = "rdp") -> None:
        self.root = Path(root)
        self.accountant = accountant

    def path(self, client_id: int | str) -> Path:
        return client_file(self.root, client_id, ".json")

    def load(self, client_id: int | str) -> Accountant:
        """The client's accountant with its full history (empty if it never trained)."""
        acc = make_accountant(self.accountant)
        path = self.path(client_id)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return acc
        acc.load_state_dict(json.loads(text))
        return acc

    def save(self, client_id: int | str, accountant: Accountant) -> Path:
        """Write the state to a temporary file in the same folder, then ``os.replace`` it:
        a reader (or a crash) never sees a half-written history."""
        if accountant.name != self.accountant:
            raise ValueError(f"store of {self.accountant!r} accountants got a {accountant.name!r} one")
        path = self.path(client_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(accountant.state_dict()))
        return path

    def client_ids(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json")) if self.root.is_dir() else []


@dataclass(frozen=True)
class ClientNoisePlan:
    """What one client's DP-SGD uses: Poisson rate q, noisy steps per round, and z."""

    sample_rate: float
    steps_per_round: int
    noise_multiplier: float


@lru_cache(maxsize=256)
def _calibrated(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    return noise_multiplier_for(epsilon, delta, sample_rate, steps, accountant)


def client_noise_plan(num_examples: int, batch_size: int, local_epochs: int, rounds: int, *,
                      delta: float, epsilon: float | None = None,
                      noise_multiplier: float | None = None,
                      accountant: str = "rdp") -> ClientNoisePlan:
    """z for a client with ``num_examples`` examples: the given ``noise_multiplier``, or the
    smallest z with which ``rounds · local_epochs · ceil(n / B)`` steps at ``q = min(1, B / n)``
    stay within ``(epsilon, delta)`` — the worst case of being sampled in every round.

    Raises :class:`UsageError` if ``delta`` is not below ``1/n`` (a guarantee that allows
    publishing one example outright is no guarantee).
    """
    if num_examples < 1:
        raise ValueError(f"num_examples {num_examples} must be >= 1")
    if not (math.isfinite(delta) and 0 < delta < 1 / num_examples):
        raise UsageError(f"--delta {delta!r} is invalid for sample-level DP on a client with "
                         f"{num_examples} examples; allowed: a number in (0, 1/n) = "
                         f"(0, {1 / num_examples:.3g})")
    q = min(1.0, batch_size / num_examples)
    per_round = int(local_epochs) * math.ceil(num_examples / batch_size)
    if noise_multiplier is not None:
        z = float(noise_multiplier)
    elif epsilon is not None:
        z = _calibrated(float(epsilon), float(delta), q, int(rounds) * per_round, accountant)
    else:
        raise UsageError("--dp sample needs --epsilon or --noise-multiplier")
    return ClientNoisePlan(sample_rate=q, steps_per_round=per_round, noise_multiplier=z)


@dataclass(frozen=True)
class PlannedBound:
    """The sample-level guarantee a run publishes: the worst case ANY client of the run can
    reach, from the plan alone (issue 24, finding 7).

    A client with ``n`` examples trains, in each round it takes part in, ``steps_per_round``
    DP-SGD steps at its ``(z_n, q_n)`` (:func:`client_noise_plan`); after ``p`` participations
    its ε is that of ``p · steps_per_round`` compositions. The bound after ``p`` participations
    is the maximum of that over the run's client sizes — never a statistic of which clients
    were sampled or returned (the published ε and z used to be the maximum / minimum over the
    replies, so they depended on the secret cohort: a round in which no sampled client had data
    published ε 0.0). With ``--epsilon`` every client refuses a round past it, so the bound
    is capped there.
    """

    plans: tuple[ClientNoisePlan, ...]
    delta: float
    accountant: str
    epsilon_cap: float | None = None

    @property
    def noise_multiplier(self) -> float | None:
        """The smallest z any client of the run trains with (None: no client can train)."""
        return min((c.noise_multiplier for c in self.plans), default=None)

    def epsilon_after(self, participations: int) -> float:
        """ε of the worst-case client after ``participations`` rounds of training."""
        return _bound_epsilon(self, int(participations))


@lru_cache(maxsize=4096)
def _bound_epsilon(bound: PlannedBound, participations: int) -> float:
    from fedpeft.privacy.accounting import repeated_epsilon

    eps = max((repeated_epsilon(bound.accountant, c.noise_multiplier, c.sample_rate,
                                participations * c.steps_per_round, bound.delta)
               for c in bound.plans), default=0.0)
    return min(eps, bound.epsilon_cap) if bound.epsilon_cap is not None else eps


def planned_client_bound(sizes: Iterable[int], batch_size: int, local_epochs: int, rounds: int, *,
                         delta: float, epsilon: float | None = None,
                         noise_multiplier: float | None = None,
                         accountant: str = "rdp") -> PlannedBound:
    """The :class:`PlannedBound` of a run whose clients hold ``sizes`` examples (the same
    :func:`client_noise_plan` every client computes for itself).

    Clients without examples never train, and a client whose δ is not below 1/n refuses to:
    neither reaches any ε. The sizes are grouped by their steps per round
    (``local_epochs · ceil(n / B)``); within a group every client runs the same number of
    steps, its q = B/n is at most the group's smallest size's, and its z at least the group's
    largest size's (a fixed z, or the calibration of the largest size, which needs the least
    noise for the same steps). The sampled Gaussian's privacy loss grows with q and shrinks
    with z, so one plan per group — (that z, that q, those steps) — bounds every member: with a
    fixed z it is exactly the worst member, with ``--epsilon`` an upper bound that costs one
    calibration per group instead of one per size.
    """
    if noise_multiplier is None and epsilon is None:
        raise UsageError("--dp sample needs --epsilon or --noise-multiplier")
    groups: dict[int, list[int]] = {}
    for n in sorted({int(n) for n in sizes}):
        if n >= 1 and delta < 1 / n:
            groups.setdefault(int(local_epochs) * math.ceil(n / batch_size), []).append(n)
    plans = []
    for steps, members in groups.items():
        z = noise_multiplier
        for n in reversed(members) if z is None else ():
            try:
                z = client_noise_plan(n, batch_size, local_epochs, rounds, delta=delta, epsilon=epsilon,
                                      accountant=accountant).noise_multiplier
                break
            except UsageError:  # this size cannot meet the budget at all: it refuses to train
                continue
        if z is not None:
            plans.append(ClientNoisePlan(sample_rate=min(1.0, batch_size / members[0]),
                                         steps_per_round=steps, noise_multiplier=float(z)))
    return PlannedBound(tuple(plans), float(delta), accountant,
                        float(epsilon) if noise_multiplier is None else None)


__all__ = ["ClientAccountantStore", "ClientNoisePlan", "PlannedBound", "client_noise_plan",
           "planned_client_bound"]
