"""Simulated client faults: dropouts and stragglers (``--dropout``, ``--straggler-prob``).

Both are drawn from ``(seed, round, client)`` so runs stay reproducible. A dropped client
raises :class:`ClientDropped` before training, which Flower turns into an error reply: the
server aggregates what arrived (weights renormalised over the replies; under user-level DP
the denominator stays the expected cohort ``q·N``, because the mechanism the accountant
analyses divides by a data-independent constant — dividing by the number of survivors would
make the sensitivity depend on who dropped). A straggler reports a simulated training time
``measured × slowdown``; the server drops replies past ``--deadline`` as late.
"""

from __future__ import annotations

import numpy as np

from fedpeft.config import RunConfig


#: the settings a client reads here
SETTINGS: tuple[str, ...] = ("seed", "dropout", "straggler_prob", "straggler_slowdown")


class ClientDropped(RuntimeError):
    """The simulated client failed to return this round."""


def _draw(cfg: RunConfig, server_round: int, client_id: int, stream: int) -> float:
    return float(np.random.default_rng([cfg.seed, server_round, client_id, stream]).random())


def check_dropout(cfg: RunConfig, server_round: int, client_id: int) -> None:
    if cfg.dropout and _draw(cfg, server_round, client_id, 0xD40) < cfg.dropout:
        raise ClientDropped(f"client {client_id} dropped out of round {server_round} (--dropout {cfg.dropout})")


def simulated_latency(cfg: RunConfig, server_round: int, client_id: int, measured_s: float) -> float:
    if cfg.straggler_prob and _draw(cfg, server_round, client_id, 0x57A) < cfg.straggler_prob:
        return measured_s * cfg.straggler_slowdown
    return measured_s
