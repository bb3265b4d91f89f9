"""Client-local parameters: tensors a strategy keeps on each client and never uploads.

FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463, §3) shares the LoRA ``A`` matrices and
keeps every client's ``B`` matrices on that client. A strategy says which tensors are local
with a class attribute ``client_local(key) -> bool`` (absent = nothing is local); the client
then

* loads its own saved local tensors over the broadcast before training,
* saves them after training, and
* leaves them out of its upload — so byte counts, compression with error feedback and
  user-level DP clipping only ever see the shared tensors.

The saved tensors live between the rounds in which a client is sampled, one safetensors file
per client ever sampled under ``<client state dir>/local_params`` (compact per-client state,
SPEC §4), replaced atomically like the error-feedback residuals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from fedpeft.atomic import atomic_write_bytes
from fedpeft.client_files import client_file
from fedpeft.errors import UsageError

State = dict[str, torch.Tensor]
#: ``is_local(key)``: True for a tensor that stays on the client.
ClientLocal = Callable[[str], bool]
V = TypeVar("V")

LOCAL_PARAMS_DIR = "local_params"
_ROUND = "server_round"  # safetensors metadata: the round that wrote the file


def client_local_of(strategy: object) -> ClientLocal | None:
    """The strategy's (class's) ``client_local`` predicate, or None when nothing is local."""
    return getattr(strategy, "client_local", None)


def shared_only(mapping: Mapping[str, V], is_local: ClientLocal | None) -> dict[str, V]:
    """The entries that leave the client (a state or an upload layout)."""
    return {k: v for k, v in mapping.items() if is_local is None or not is_local(k)}


def local_only(mapping: Mapping[str, V], is_local: ClientLocal) -> dict[str, V]:
    """The entries that stay on the client."""
    return {k: v for k, v in mapping.items() if is_local(k)}


class LocalParamStore:
    """One ``<client key>.safetensors`` per client under ``directory``; nothing in memory.

    Each file records the round that wrote it: loading in a round at or before that one means
    the state directory holds another run's parameters (a reused node ``state-dir``), which
    would silently personalise this run with foreign tensors, so it is refused.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return client_file(self.directory, key, ".safetensors")

    def load(self, key: str, server_round: int) -> State | None:
        """The client's local tensors as saved in an earlier round, or None if never saved."""
        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as fh:
                saved_round = int((fh.metadata() or {}).get(_ROUND, "0"))
                state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - not a dict
        except FileNotFoundError:
            return None
        if saved_round >= server_round:
            raise UsageError(
                f"client {key}: its local parameters at {path} were written in round {saved_round}, "
                f"not before this round {server_round} (stale client state from an earlier run?); "
                "remove that file or use a fresh state directory")
        return state

    def save(self, key: str, state: State, server_round: int) -> None:
        path = self.path(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        data = save_bytes({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                          metadata={_ROUND: str(server_round)})
        atomic_write_bytes(path, data)
