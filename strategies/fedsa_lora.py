"""FedSA-LoRA (SPEC §2.4; Guo et al., ICLR 2025, arXiv 2410.01463).

FedSA-LoRA shares only the LoRA ``A`` matrices (they learn general knowledge) and keeps
each client's ``B`` matrices on that client (client-specific knowledge).

Server (this class): the new global state is the FedAvg mean of every uploaded tensor —
every ``lora_A``, the classifier head and any other shared tensor; the global ``B`` tensors
are left exactly as they were, i.e. at their initial value (peft LoRA: zeros) for the whole
run.

Client (:func:`fedpeft.federation.client.train_client`, driven by :attr:`client_local`):

* each client keeps its own ``B`` between the rounds in which it is sampled, in per-client
  state (``<client state dir>/local_params/<client key>.safetensors``, only for clients ever
  sampled; copied into checkpoints with the rest of the client state). It loads the
  broadcast (global ``A`` + head), then its saved ``B`` over it (first time: the initial
  ``B``), trains, and saves its ``B``;
* its upload omits ``B``: byte counts, ComPEFT compression with error feedback and
  user-level DP clipping cover ``A`` + head only. The server's honest-upload layouts are
  filtered the same way (:attr:`upload_layout` here; ``privacy_plan`` for user-level DP),
  so ``B``-less uploads are accepted and a ``B`` sent anyway is rejected;
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

import re
from collections.abc import Callable, Sequence

from flwr.app import Message

from fedpeft.adapters.base import Adapter, State
from fedpeft.federation.local_params import shared_only
from fedpeft.federation.validation import Layout
from fedpeft.aggregation import weighted_mean
from fedpeft.strategy import ClientSampler, ClientUpdate, FedPeftStrategy, stack_uploads
from fedpeft.strategy import STRATEGIES

_LORA_B = re.compile(r"^.+\.lora_B\.[^.]+\.weight$")

UploadLayout = Callable[[int | None], Layout]


def is_lora_b(key: str) -> bool:
    """True for a peft LoRA ``B`` parameter name (``...lora_B.<adapter>.weight``)."""
    return _LORA_B.match(key) is not None


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


def _without_local(layout: UploadLayout) -> UploadLayout:
    def shared(round_rank: int | None) -> Layout:
        return shared_only(layout(round_rank), is_lora_b)

    return shared


@STRATEGIES.register("fedsa-lora")
class FedSaLora(FedPeftStrategy):
    name = "fedsa-lora"
    #: The tensors each client keeps and never uploads (read by the client, see
    #: :mod:`fedpeft.federation.local_params`).
    client_local = staticmethod(is_lora_b)

    def __init__(self, adapter: Adapter, sampler: ClientSampler) -> None:
        self._upload_layout: UploadLayout | None = None
        super().__init__(adapter, sampler)

    @property
    def upload_layout(self) -> UploadLayout | None:
        """``round_rank -> layout`` of an honest upload, which has no ``B`` tensors."""
        return self._upload_layout

    @upload_layout.setter
    def upload_layout(self, layout: UploadLayout | None) -> None:
        # the server sets the adapter's full upload layout; FedSA clients keep B at home
        self._upload_layout = None if layout is None else _without_local(layout)

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        states, weights = stack_uploads(updates)
        shared = weighted_mean([shared_part(s) for s in states], weights)
        return self.adapter.merge(global_state, shared, self._round_rank)

    def broadcast_state(self, global_state: State, round_rank: int | None) -> State:
        """The shared tensors only: a client trains from its own ``B`` (or the initial one,
        which it rebuilds from the seed), so the constant global ``B`` is not sent."""
        return shared_part(super().broadcast_state(global_state, round_rank))

    def aggregation_error(self, global_state: State, updates: Sequence[ClientUpdate],
                          new_global: State) -> float | None:
        """Not defined: there is no single global product to compare (each client keeps its
        own ``B``), so results report null rather than a trivially zero number."""
        return None

    def round_metrics(self, replies: Sequence[Message], updates: Sequence[ClientUpdate]) -> dict[str, float]:
        metrics = super().round_metrics(replies, updates)
        trained = [u for u in updates if u.num_examples > 0]
        for key in ("personalized-accuracy", "personalized-majority"):
            value = personalized_accuracy(trained, key)
            if value is not None:
                metrics[key] = value
        return metrics
