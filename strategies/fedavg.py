"""FedAvg (SPEC §2.1): example-weighted mean of every uploaded tensor.

For LoRA this averages A and B separately — the inexact baseline whose aggregation error
(SPEC §1.1) the base class records every round.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft.adapters.base import State
from fedpeft.aggregation import weighted_mean
from fedpeft.strategy import ClientUpdate, FedPeftStrategy, stack_uploads
from fedpeft.strategy import STRATEGIES


@STRATEGIES.register("fedavg")
class FedAvg(FedPeftStrategy):
    name = "fedavg"

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  round_rank: int | None = None) -> State:
        states, weights = stack_uploads(updates)
        return self.adapter.merge(global_state, weighted_mean(states, weights), round_rank)
