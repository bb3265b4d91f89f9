"""Client-side error feedback and the compact per-client residual store (SPEC §2.3, §4).

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD"; used by ComPEFT in
federated rounds): client ``i`` compresses its update plus what earlier compressions
dropped, and keeps the new difference::

    sent_i  = C(τ_i + e_i)
    e_i    <- (τ_i + e_i) - sent_i

so after ``T`` participations ``Σ_t sent_t + e_T = Σ_t τ_t``: nothing is lost, only delayed.

The residual ``e_i`` lives between the rounds in which client ``i`` is sampled, so with
1000s of virtual clients it must not sit in memory (SPEC §4). :class:`DiskResidualStore`
keeps one safetensors file per client that was ever sampled and nothing in memory;
:class:`InMemoryResidualStore` is for tests and small federations.

Shapes may change between rounds (DP-DyLoRA uploads a rank prefix ``b_t`` of its factors,
SPEC §1.3): the residual of a key is kept at the largest shape seen, the update is
matched to its leading block, and only that block is replaced — the rest of the residual
is carried untouched, so the running-sum identity holds per coordinate.

Interaction with user-level DP (SPEC §2.3, §3.1): the clipping to norm ``S`` applies to
what the server receives, i.e. to ``sent_i`` AFTER compression — clip the decoded dense
update (its norm is ``sqrt(kept) · magnitude``), never ``τ_i`` before it, or the
server-side sensitivity bound does not hold for the compressed value. The residual never
leaves the client and is not part of the privacy analysis of the upload; it is however
client state derived from the client's data, so it must stay on the client side (or in
storage only that client's process reads). Clipping does not feed back into ``e_i``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from fedpeft.atomic import atomic_write_bytes
from fedpeft.client_files import client_file
from fedpeft.updates import prefix_slice
from fedpeft.compression.codec import Codec, State

ClientId = int | str

_SUFFIX = ".safetensors"


class ResidualStore(ABC):
    """Per-client residual tensors, keyed by client id."""

    @abstractmethod
    def get(self, client_id: ClientId) -> State | None:
        """The client's residual, or ``None`` if it was never stored."""

    @abstractmethod
    def put(self, client_id: ClientId, residual: State) -> None:
        """Store (replace) the client's residual."""

    @abstractmethod
    def delete(self, client_id: ClientId) -> None:
        """Forget the client's residual (no error if absent)."""

    @abstractmethod
    def client_ids(self) -> Iterator[str]:
        """Ids (as strings) of the clients with a stored residual."""

    def __contains__(self, client_id: object) -> bool:
        return isinstance(client_id, (int, str)) and self.get(client_id) is not None

    def __len__(self) -> int:
        return sum(1 for _ in self.client_ids())


class InMemoryResidualStore(ResidualStore):
    """A dict of residuals (copies in, copies out)."""

    def __init__(self) -> None:
        self._items: dict[str, State] = {}

    def get(self, client_id: ClientId) -> State | None:
        state = self._items.get(str(client_id))
        return None if state is None else {k: v.clone() for k, v in state.items()}

    def put(self, client_id: ClientId, residual: State) -> None:
        self._items[str(client_id)] = {k: v.detach().clone() for k, v in residual.items()}

    def delete(self, client_id: ClientId) -> None:
        self._items.pop(str(client_id), None)

    def client_ids(self) -> Iterator[str]:
        return iter(sorted(self._items))


class DiskResidualStore(ResidualStore):
    """One ``<client id>.safetensors`` per client under ``directory``; nothing in memory.

    Writes go to a temporary file in the same directory followed by ``os.replace``, so a
    reader (or a crash) sees either the old or the new residual, never a torn file. Each
    client is written by at most one process per round, so no locking is needed.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, client_id: ClientId) -> Path:
        return client_file(self.directory, client_id, _SUFFIX)

    def get(self, client_id: ClientId) -> State | None:
        path = self.path(client_id)
        try:
            return load_file(path)
        except FileNotFoundError:
            return None

    def put(self, client_id: ClientId, residual: State) -> None:
        path = self.path(client_id)
        data = save_bytes({k: v.detach().cpu().contiguous().clone() for k, v in residual.items()})
        atomic_write_bytes(path, data)

    def delete(self, client_id: ClientId) -> None:
        self.path(client_id).unlink(missing_ok=True)

    def client_ids(self) -> Iterator[str]:
        names = (e.name for e in os.scandir(self.directory)
                 if e.is_file() and e.name.endswith(_SUFFIX) and not e.name.startswith("."))
        return iter(sorted(n[: -len(_SUFFIX)] for n in names))

    def __contains__(self, client_id: object) -> bool:
        return isinstance(client_id, (int, str)) and self.path(client_id).exists()


# -- the error-feedback step ---------------------------------------------------------------
def _block(shape: torch.Size | tuple[int, ...]) -> tuple[slice, ...]:
    return prefix_slice(shape)


def _grown(residual: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``residual`` zero-padded to cover ``shape`` (leading-block embedding)."""
    if residual.shape == shape:
        return residual
    if residual.dim() != len(shape):
        raise ValueError(f"residual of rank {residual.dim()} cannot hold an update of shape {tuple(shape)}")
    big = torch.zeros([max(a, b) for a, b in zip(residual.shape, shape)], dtype=residual.dtype)
    big[_block(residual.shape)] = residual
    return big


def error_feedback_step(update: State, residual: State | None,
                        codec: Codec) -> tuple[bytes, State, State]:
    """One client upload with error feedback: ``(payload, sent, new residual)``.

    ``sent = C(τ + e)`` is the dense value the server reconstructs from ``payload``
    (bit-identical to ``codec.decode(payload)``); ``new residual = (τ + e) - sent`` in
    float32. Keys of the old residual that the update does not contain are carried over.
    """
    residual = {} if residual is None else dict(residual)
    corrected: State = {}
    for key, tau in update.items():
        tau32 = tau.detach().to("cpu", torch.float32)
        old = residual.get(key)
        if old is None:
            corrected[key] = tau32.clone()
        else:
            old = _grown(old.to(torch.float32), tau32.shape)
            residual[key] = old
            corrected[key] = tau32 + old[_block(tau32.shape)]
    payload = codec.encode(corrected)
    sent = codec.compress(corrected)
    for key, value in corrected.items():
        err = value - sent[key].to(torch.float32)
        if key in residual and residual[key].shape != err.shape:
            big = residual[key].clone()
            big[_block(err.shape)] = err
            residual[key] = big
        else:
            residual[key] = err
    return payload, sent, residual


class ErrorFeedback:
    """A codec with per-client error feedback, its residuals kept in a :class:`ResidualStore`."""

    def __init__(self, codec: Codec, store: ResidualStore) -> None:
        self.codec = codec
        self.store = store

    def encode(self, client_id: ClientId, update: State) -> tuple[bytes, State]:
        """``(payload, sent)`` for this client's update; its residual is updated in the store."""
        payload, sent, residual = error_feedback_step(update, self.store.get(client_id), self.codec)
        self.store.put(client_id, residual)
        return payload, sent
