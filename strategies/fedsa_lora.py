"""FedSA-LoRA, SERVER SIDE ONLY (SPEC §2.4; Guo et al., ICLR 2025, arXiv 2410.01463).

FedSA-LoRA shares only the LoRA ``A`` matrices (they learn general knowledge) and keeps
each client's ``B`` matrices on that client (client-specific knowledge). This module
implements the server half: the new global state is the FedAvg mean of every uploaded
tensor EXCEPT the ``lora_B`` ones (so: every ``lora_A``, the classifier head and any other
shared tensor), and the global ``B`` tensors are left exactly as they were.

NOT IMPLEMENTED — the client half, without which this is not yet FedSA-LoRA:

* Each client must keep its own ``B`` between the rounds in which it is sampled, persisted
  in per-client state keyed by client id (compact storage, as SPEC §4 asks for per-client
  state), loaded over the broadcast before local training, and saved after it.
* Today the client loads the whole broadcast, so every round it restarts from the global
  ``B`` — which this strategy never changes (for peft LoRA that is the zero init). Each
  client thus trains ``A``, ``B`` and the head from ``B = B_init`` every round and the
  server keeps only the ``A`` and head part.
* Clients still upload ``B`` (the server drops it): uploads, byte counts and any DP clipping
  include coordinates the server ignores. An upload filter belongs in the client/adapter.
* Evaluation: FedSA-LoRA evaluates each client's personalized model (shared ``A`` + its own
  ``B``); fedpeft evaluates the global state centrally, i.e. ``A`` with the initial ``B``
  (for peft LoRA, ``B = 0``: the LoRA branch contributes nothing and only the head counts).
* The base class's ``aggregation-error`` compares the clients' ``Σ p_i B_i A_i`` with the
  global ``B A``; since global ``B`` is never updated it reads ~1 once clients have trained.
  It is true of the global model evaluated, but not a meaningful FedSA quantity.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from logging import WARNING

from flwr.common import log

from fedpeft.adapters.base import Adapter, State
from strategies.aggregation import weighted_mean
from strategies.base import ClientSampler, ClientUpdate, FedPeftStrategy, stack_uploads
from strategies.registry import STRATEGIES

_LORA_B = re.compile(r"^.+\.lora_B\.[^.]+\.weight$")


def is_lora_b(key: str) -> bool:
    """True for a peft LoRA ``B`` parameter name (``...lora_B.<adapter>.weight``)."""
    return _LORA_B.match(key) is not None


def shared_part(state: State) -> State:
    """What FedSA-LoRA aggregates: everything but the ``lora_B`` tensors."""
    return {k: v for k, v in state.items() if not is_lora_b(k)}


@STRATEGIES.register("fedsa-lora")
class FedSaLora(FedPeftStrategy):
    name = "fedsa-lora"

    def __init__(self, adapter: Adapter, sampler: ClientSampler) -> None:
        super().__init__(adapter, sampler)
        log(WARNING, "fedsa-lora: server side only — clients do not keep a local B yet, so "
                     "they restart from the global (initial) B every round; see strategies/fedsa_lora.py")

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        states, weights = stack_uploads(updates)
        shared = weighted_mean([shared_part(s) for s in states], weights)
        return self.adapter.merge(global_state, shared, self._round_rank)
