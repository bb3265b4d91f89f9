"""Atomic server checkpoints and resume (``--checkpoint-every K``, ``fedpeft simulate --resume``).

A checkpoint holds everything the rest of the run depends on:
- the global adapter + head (``global.safetensors``),
- with ``--compress-down``, the clients' mirror of the global and the per-client download
  ledger (``downlink.safetensors``, ``downlink_state`` in ``server.json``),
- the finished rounds' records, strategy/privacy state (accountant history, adaptive clip,
  per-run ε so far) as JSON (``server.json``),
- a copy of the per-client state directory (error-feedback residuals, sample-level
  accountants) as it was after that round,
- under DP, the run's secret privacy key (``privacy.key``, mode 0600,
  :mod:`fedpeft.privacy.randomness`): the resumed run continues the same cohort and noise
  streams. The checkpoint directory is mode 0700: it is server-private, never a result.
Every other draw (DP-DyLoRA rank, client shuffling, the cohort and noise of runs without DP)
is seeded by ``(seed, round[, client])``, so round t+1 after a resume sees exactly the draws of
an uninterrupted run.

The directory is written beside the old one and swapped in with renames, so a crash during
checkpointing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedpeft.adapters.base import State
from fedpeft.errors import UsageError
from fedpeft.privacy.randomness import KEY_FILE, RandomStreams, SecretStreams
from fedpeft.results import RoundRecord

CHECKPOINT_DIR = "checkpoint"


@dataclass
class Checkpoint:
    round: int
    global_state: State
    records: list[RoundRecord]
    strategy_state: dict[str, Any]
    privacy_state: dict[str, Any]
    #: compressed broadcast (``--compress-down``): ledger as JSON, mirror state as tensors
    downlink_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    downlink_tensors: State = dataclasses.field(default_factory=dict)
    #: the run's privacy streams when they are secret (None: seeded, nothing to keep)
    streams: RandomStreams | None = None
    #: the records as published (under DP: covered fields only); None = same as ``records``
    published: list[RoundRecord] | None = None
    #: the server optimiser (SPEC §3.6): scalars as JSON, moment buffers as tensors
    server_opt_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    server_opt_tensors: State = dataclasses.field(default_factory=dict)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint, client_state: Path) -> Path:
    final = run_dir / CHECKPOINT_DIR
    tmp = run_dir / f".{CHECKPOINT_DIR}.tmp"
    old = run_dir / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    os.chmod(tmp, 0o700)
    if isinstance(ckpt.streams, SecretStreams):
        ckpt.streams.save(tmp)
    save_file({k: v.contiguous() for k, v in ckpt.global_state.items()}, str(tmp / "global.safetensors"))
    if ckpt.server_opt_tensors:
        save_file({k: v.contiguous() for k, v in ckpt.server_opt_tensors.items()},
                  str(tmp / "server_opt.safetensors"))
    if ckpt.downlink_tensors:
        save_file({k: v.contiguous() for k, v in ckpt.downlink_tensors.items()},
                  str(tmp / "downlink.safetensors"))
    meta = {"round": ckpt.round, "records": [dataclasses.asdict(r) for r in ckpt.records],
            "strategy_state": ckpt.strategy_state, "privacy_state": ckpt.privacy_state,
            "downlink_state": ckpt.downlink_state, "server_opt_state": ckpt.server_opt_state,
            "published": ([dataclasses.asdict(r) for r in ckpt.published]
                          if ckpt.published is not None else None)}
    (tmp / "server.json").write_text(json.dumps(meta))
    if client_state.is_dir():
        shutil.copytree(client_state, tmp / "client_state")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> Checkpoint:
    path = run_dir / CHECKPOINT_DIR
    if not (path / "server.json").is_file():
        raise UsageError(f"--resume {str(run_dir)!r} has no checkpoint; it needs a run started with --checkpoint-every")
    meta = json.loads((path / "server.json").read_text())
    downlink = path / "downlink.safetensors"
    server_opt = path / "server_opt.safetensors"
    return Checkpoint(round=int(meta["round"]), global_state=load_file(str(path / "global.safetensors")),
                      records=[RoundRecord(**r) for r in meta["records"]],
                      strategy_state=meta["strategy_state"], privacy_state=meta["privacy_state"],
                      downlink_state=meta.get("downlink_state", {}),
                      downlink_tensors=load_file(str(downlink)) if downlink.is_file() else {},
                      server_opt_state=meta.get("server_opt_state", {}),
                      server_opt_tensors=load_file(str(server_opt)) if server_opt.is_file() else {},
                      streams=SecretStreams.load(path) if (path / KEY_FILE).is_file() else None,
                      published=([RoundRecord(**r) for r in meta["published"]]
                                 if meta.get("published") is not None else None))


def restore_client_state(run_dir: Path, client_state: Path) -> None:
    """Put the per-client state back exactly as it was at the checkpoint."""
    saved = run_dir / CHECKPOINT_DIR / "client_state"
    shutil.rmtree(client_state, ignore_errors=True)
    if saved.is_dir():
        shutil.copytree(saved, client_state)
