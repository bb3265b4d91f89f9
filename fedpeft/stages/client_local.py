"""Tensors a strategy keeps on the clients never leave them (FedSA-LoRA's ``B``, SPEC §2.4):
the whole client half of such a strategy.

FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463, §3) shares the LoRA ``A`` matrices and
keeps every client's ``B`` matrices on that client. A strategy says which tensors are local
with a class attribute ``client_local(key) -> bool`` (absent = nothing is local; the server
half, aggregation, is the strategy's). This stage is active exactly when the run's strategy
has one, and on each client

* loads the client's own saved local tensors over the broadcast before training (first time:
  the initial ones, which the server's global copy never leaves), :meth:`before_training`;
* drops them from the upload and from the honest layout the server checks against, so byte
  counts, compression with error feedback and user-level DP clipping, all later in the
  pipeline, only ever see the shared tensors, :meth:`on_client`;
* saves them after training and evaluates the client's personalized model on a local test set
  shaped like its own data (:mod:`fedpeft.training.personal_eval`), :meth:`after_training`.

The saved tensors live between the rounds in which a client is sampled, one safetensors file
per client ever sampled under ``<client state dir>/local_params`` (compact per-client state,
SPEC §4), replaced atomically like the error-feedback residuals.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from fedpeft.atomic import atomic_write_bytes
from fedpeft.client_files import client_file
from fedpeft.errors import UsageError
from fedpeft.pipeline import STAGES, BuildEnv, ClientContext, Layout, Metrics, Stage, State

if TYPE_CHECKING:
    from fedpeft.config import RunConfig
    from fedpeft.engine.client import LocalTask
    from fedpeft.strategy import FedPeftStrategy

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


def local_test_seed(seed: int, key: str) -> list[int]:
    """Seed of a client's local test set: the run seed and the client (its state key), never
    the round (a client is evaluated on the same examples every time it is sampled)."""
    return [seed, 0x9E75, zlib.crc32(key.encode())]


def personalized_metrics(task: LocalTask, broadcast: State, is_local: ClientLocal) -> dict[str, float]:
    """Accuracy of the client's personalized model — the broadcast's shared tensors (global
    ``A`` and head) with its own freshly trained local ones (``B``) — on its local test set.

    Leaves the model holding exactly that personalized state."""
    from fedpeft.training.personal_eval import LOCAL_TEST_SIZE, evaluate_rows, local_test_rows

    ws = task.ws
    ws.adapter.load_state(ws.model, shared_only(broadcast, is_local))
    test_rows = local_test_rows(ws.train.labels[task.rows], ws.test.labels, LOCAL_TEST_SIZE,
                                np.random.default_rng(local_test_seed(task.cfg.seed, task.rnd.key)))
    if len(test_rows) == 0:
        return {}
    ev = evaluate_rows(ws.model, ws.test, test_rows, ws.pad_id)
    # the baseline that makes the number readable under label skew: always predicting the
    # client's most frequent local label
    majority = float(np.bincount(np.asarray(ws.test.labels)[test_rows]).max() / len(test_rows))
    return {"personalized-accuracy": ev.accuracy, "personalized-examples": float(ev.examples),
            "personalized-majority": majority}


@STAGES.register("client-local")
class KeepClientLocal(Stage):
    name = "client-local"
    order = 10

    def __init__(self, is_local: ClientLocal) -> None:
        self.is_local = is_local

    @classmethod
    def active(cls, cfg: RunConfig, strategy: type[FedPeftStrategy]) -> bool:
        return client_local_of(strategy) is not None

    @classmethod
    def create(cls, env: BuildEnv) -> KeepClientLocal:
        is_local = client_local_of(env.strategy)
        assert is_local is not None  # active() checked it (or the server named this stage)
        return cls(is_local)

    @classmethod
    def client_settings(cls, cfg: RunConfig) -> tuple[str, ...]:
        return ("strategy", "seed")  # the predicate's owner; the local test set's seed

    @staticmethod
    def store(ctx: ClientContext) -> LocalParamStore:
        return LocalParamStore(ctx.state_dir / LOCAL_PARAMS_DIR)

    def before_training(self, task: LocalTask, ctx: ClientContext) -> None:
        """The client's own local tensors over the broadcast (first time: the initial ones)."""
        ws = task.ws
        own = self.store(ctx).load(ctx.key, ctx.server_round)
        ws.adapter.load_state(ws.model, own if own is not None else local_only(ws.initial_state, self.is_local))

    def on_client(self, update: State, ctx: ClientContext) -> tuple[State, Metrics]:
        return shared_only(update, self.is_local), {}

    def after_training(self, task: LocalTask, ctx: ClientContext) -> Metrics:
        """Save the freshly trained local tensors, then evaluate the personalized model (which
        loads the broadcast's shared tensors back)."""
        ws = task.ws
        self.store(ctx).save(ctx.key, local_only(ws.adapter.trainable_state(ws.model), self.is_local),
                             ctx.server_round)
        return personalized_metrics(task, ctx.broadcast, self.is_local)

    def client_layout(self, layout: Layout, client_id: int | None) -> Layout:
        return shared_only(layout, self.is_local)

    def describe(self) -> str:
        return "keep client-local tensors"
