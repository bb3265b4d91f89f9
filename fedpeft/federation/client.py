"""One client's round as a plain function (the ClientApp is a thin Flower wrapper on it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.adapters import State
from fedpeft.config import RunConfig
from fedpeft.data.tokenized import shuffled_batches
from fedpeft.federation.workspace import Workspace
from fedpeft.training.local import LocalResult, train_local


@dataclass(frozen=True)
class ClientRound:
    client_id: int
    num_partitions: int
    server_round: int
    round_rank: int | None


def client_seed(cfg: RunConfig, rnd: ClientRound) -> list[int]:
    """Independent, reproducible stream per (run seed, round, client)."""
    return [cfg.seed, rnd.server_round, rnd.client_id]


def run_client_round(ws: Workspace, cfg: RunConfig, rnd: ClientRound,
                     broadcast: State) -> tuple[State, LocalResult]:
    parts = ws.partitions(cfg.partition, rnd.num_partitions, cfg.dirichlet_alpha, cfg.seed)
    rows = parts.indices(rnd.client_id)
    if cfg.max_client_examples:
        rows = rows[: cfg.max_client_examples]
    ws.adapter.load_state(ws.model, broadcast)
    if len(rows) == 0:
        return {}, LocalResult(mean_loss=float("nan"), steps=0, examples=0)
    rng = np.random.default_rng(client_seed(cfg, rnd))
    torch.manual_seed(int(rng.integers(2**31)))
    epochs = (shuffled_batches(ws.train, rows, cfg.batch_size, rng, ws.pad_id)
              for _ in range(cfg.local_epochs))
    hook = ws.adapter.step_hook(ws.model, rng, rnd.round_rank)
    result = train_local(ws.model, epochs, cfg.lr, before_step=hook)
    return ws.adapter.upload(ws.model, rnd.round_rank), LocalResult(
        mean_loss=result.mean_loss, steps=result.steps, examples=len(rows))
