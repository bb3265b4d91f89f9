"""FedSA-LoRA (SPEC §2.4; Guo et al., ICLR 2025, arXiv 2410.01463).

FedSA-LoRA shares only the LoRA ``A`` matrices (they learn general knowledge) and keeps
each client's ``B`` matrices on that client (client-specific knowledge).

Server (this class): the new global state is the FedAvg mean of every uploaded tensor —
every ``lora_A``, the classifier head and any other shared tensor; the global ``B`` tensors
are left exactly as they were, i.e. at their initial value (peft LoRA: zeros) for the whole
run.

Client (the ``client-local`` stage, :mod:`fedpeft.stages.client_local`, driven by
:attr:`client_local`: it is active exactly when a strategy has one):

* each client keeps its own ``B`` between the rounds in which it is sampled, in per-client
  state (``<client state dir>/local_params/<client key>.safetensors``, only for clients ever
  sampled; copied into checkpoints with the rest of the client state). It loads the
  broadcast (global ``A`` + head), then its saved ``B`` over it (first time: the initial
  ``B``), trains, and saves its ``B``;
* its upload omits ``B``: byte counts, ComPEFT compression with error feedback and
  user-level DP clipping cover ``A`` + head only: the stage drops them from the upload and
  from the honest layout the server checks, so a ``B`` sent anyway is rejected;
* it evaluates its personalized model — the broadcast's global ``A`` and head with its
  freshly trained ``B`` — on a local test set drawn from the central test split with its
  own train label proportions (:mod:`fedpeft.training.personal_eval`), and reports
  ``personalized-accuracy``; :meth:`round_metrics` adds the example-weighted mean over the
  round's accepted replies. Under user-level DP this is a diagnostic like ``train-loss``
  (computed from raw replies, not covered by the guarantee); under sample-level DP ``B`` is
  trained by DP-SGD like everything else.

What differs from the paper, or is not meaningful here:

* The ``A`` in the personalized evaluation is the one the client received, one aggregation
  older than the round's new global ``A`` (a client only sees that when next sampled), and
  only the round's sampled clients are evaluated (the paper evaluates every client).
* fedpeft's central evaluation (``eval_accuracy``) evaluates the global state, i.e. the
  shared ``A`` and head with the INITIAL ``B`` — for peft LoRA ``B = 0``, so the LoRA branch
  contributes nothing and only the head counts. It is not FedSA-LoRA's reported metric;
  ``personalized_accuracy`` is.
* ``aggregation_error`` is reported as null: without the clients' ``B`` there is no global
  product ``B A`` whose error could be measured.
* The broadcast leaves out the (constant) global ``B``: ``bytes_down`` counts ``A`` + head.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft.adapters.base import State, lora_factor
from fedpeft.aggregation import weighted_mean
from fedpeft.strategy import ClientUpdate, FedPeftStrategy, stack_uploads
from fedpeft.strategy import STRATEGIES


def is_lora_b(key: str) -> bool:
    """True for a peft LoRA ``B`` parameter name (``...lora_B.<adapter>.weight``)."""
    return lora_factor(key) == "B"


def shared_part(state: State) -> State:
    """What FedSA-LoRA aggregates: everything but the ``lora_B`` tensors."""
    return {k: v for k, v in state.items() if not is_lora_b(k)}


def personalized_accuracy(updates: Sequence[ClientUpdate], key: str = "personalized-accuracy") -> float | None:
    """Mean of the clients' ``key`` (default ``personalized-accuracy``), weighted by their
    local test sizes."""
    rated = [(u.metrics[key], u.metrics.get("personalized-examples", 1.0))
             for u in updates if key in u.metrics]
    total = sum(n for _, n in rated)
    return sum(acc * n for acc, n in rated) / total if total > 0 else None


@STRATEGIES.register("fedsa-lora")
class FedSaLora(FedPeftStrategy):
    name = "fedsa-lora"
    #: The tensors each client keeps and never uploads (read by the client, see
    #: :mod:`fedpeft.engine.local_params`).
    client_local = staticmethod(is_lora_b)

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate],
                  round_rank: int | None = None) -> State:
        states, weights = stack_uploads(updates)
        shared = weighted_mean([shared_part(s) for s in states], weights)
        return self.adapter.merge(global_state, shared, round_rank)

    def broadcast_state(self, global_state: State, round_rank: int | None) -> State:
        """The shared tensors only: a client trains from its own ``B`` (or the initial one,
        which it rebuilds from the seed), so the constant global ``B`` is not sent."""
        return shared_part(super().broadcast_state(global_state, round_rank))

    def aggregation_error(self, global_state: State, updates: Sequence[ClientUpdate],
                          new_global: State) -> float | None:
        """Not defined: there is no single global product to compare (each client keeps its
        own ``B``), so results report null rather than a trivially zero number."""
        return None

    def round_metrics(self, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        metrics = {}
        trained = [u for u in updates if u.num_examples > 0]  # a client without data evaluates nothing
        for key in ("personalized-accuracy", "personalized-majority"):
            value = personalized_accuracy(trained, key)
            if value is not None:
                metrics[key] = value
        return metrics
