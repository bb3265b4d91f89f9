"""The server broadcast: the global state as is, or compressed with error feedback
(``--compress-down``, SPEC §2.3 "optionally also the server's broadcast delta").

Compressed broadcast keeps two models on the server: the true global ``x_t`` (what the
strategy produces; evaluated and checkpointed) and the mirror ``x̂_t`` every client holds,
rebuilt only from compressed deltas::

    x̂_t     = x̂_{t-1} + C(x_t − x̂_{t-1})          (what is broadcast in round t)
    x_{t+1} = x_t + (strategy(x̂_t, updates) − x̂_t)  (clients' step applied to the true model)

``x_t − x̂_t`` is the server's error-feedback residual: what one compression drops is
sent in later rounds, never lost (the same identity as the clients' error feedback).

Bytes: a client that last synchronised in round ``s`` (0 = it holds the seeded initial
state, which every party can rebuild) needs the encoded deltas of rounds ``s+1..t``; it
is charged their real encoded sizes, or the dense broadcast if that is smaller. The
server keeps one integer per client ever sampled (compact even at 100k clients). In
simulation the message carries the reconstructed ``x̂_t`` itself (a client process does
not keep ``x̂`` between rounds); the decoded values are bit-identical to what a client
applying those payloads would hold.

Privacy: the broadcast is a function of the already privatised global model, so
compressing it is post-processing and changes no ε.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.adapters.base import State
from fedpeft.compression import Codec, wire
from fedpeft.records import payload_bytes, to_record


class Downlink:
    """Uncompressed broadcast: clients receive ``x_t`` itself."""

    def prepare(self, global_state: State, server_round: int) -> State:
        """The state to broadcast in ``server_round``."""
        return global_state

    def absorb(self, global_state: State, sent: State, aggregated: State) -> State:
        """The new true global, given the strategy's output computed from ``sent``."""
        return aggregated

    def bytes_down(self, client_ids: list[int], server_round: int) -> int | None:
        """Bytes sent to ``client_ids`` this round (None: the strategy's own count)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> State:
        return {}

    def load_state_dict(self, state: dict[str, Any], tensors: State) -> None:
        pass


class CompressedDownlink(Downlink):
    """Broadcast ``x̂_t`` built from codec-compressed deltas (see the module docstring)."""

    def __init__(self, codec: Codec, initial: State) -> None:
        self.codec = codec
        self.mirror: State = {k: v.clone() for k, v in initial.items()}
        self.dense_bytes = payload_bytes(to_record(initial))
        #: encoded bytes of the delta of round t, index t (index 0: the shared initial state)
        self.sizes: list[int] = [0]
        self.last_sync: dict[int, int] = {}

    def prepare(self, global_state: State, server_round: int) -> State:
        # sorted keys: the payload (header and position code) must not depend on dict order,
        # which a checkpoint round trip changes
        delta = {k: global_state[k].to(torch.float64) - self.mirror[k].to(torch.float64)
                 for k in sorted(self.mirror)}
        payload = self.codec.encode(delta)
        decoded = self.codec.decode(payload)
        self.mirror = {k: (v.to(torch.float64) + decoded[k].to(torch.float64)).to(v.dtype)
                       for k, v in self.mirror.items()}
        self.sizes.append(payload_bytes(wire.to_record(payload)))
        return self.mirror

    def absorb(self, global_state: State, sent: State, aggregated: State) -> State:
        return {k: (global_state[k].to(torch.float64) + aggregated[k].to(torch.float64)
                    - sent[k].to(torch.float64)).to(global_state[k].dtype) for k in global_state}

    def bytes_down(self, client_ids: list[int], server_round: int) -> int:
        total = 0
        for client in client_ids:
            since = self.last_sync.get(client, 0)
            total += min(sum(self.sizes[since + 1:server_round + 1]), self.dense_bytes)
            self.last_sync[client] = server_round
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "last_sync": {str(k): v for k, v in self.last_sync.items()}}

    def tensors(self) -> State:
        return self.mirror

    def load_state_dict(self, state: dict[str, Any], tensors: State) -> None:
        self.sizes = [int(s) for s in state["sizes"]]
        self.last_sync = {int(k): int(v) for k, v in state["last_sync"].items()}
        self.mirror = {k: v.clone() for k, v in tensors.items()}


def build_downlink(compress_down: bool, codec: Codec | None, initial: State) -> Downlink:
    if not compress_down:
        return Downlink()
    if codec is None:
        raise ValueError("a compressed downlink needs a codec")
    return CompressedDownlink(codec, initial)
