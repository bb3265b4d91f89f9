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
  :mod:`fedpeft.privacy.randomness`); a resumed run keeps the key but draws fresh cohorts and
  noise (a new nonce per attempt). The checkpoint directory is mode 0700: it is server-private,
  never a result.
- under DP, the attempt ledger (``attempts``, mode 0600): one line per round attempt started
  after this checkpoint was written, appended and fsync'd before the round's first message
  leaves the server (:func:`record_attempt`). A process that dies after round t+2 of a run
  checkpointed at t may already have released rounds t+1 and t+2 (results, broadcasts); its
  resume re-runs them with fresh noise, so the accountant must count both attempts: on resume
  every ledger line is one more Poisson-sampled Gaussian mechanism (issue 24, finding 4). A new
  checkpoint starts an empty ledger: by then every earlier attempt is in its accountant.
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
ATTEMPTS_FILE = "attempts"


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
    #: the iterate average (``--ema``, :mod:`fedpeft.iterate_average`): scalars and sums
    ema_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    ema_tensors: State = dataclasses.field(default_factory=dict)
    #: rounds attempted after this checkpoint was written (the ledger, :func:`record_attempt`)
    attempts: list[int] = dataclasses.field(default_factory=list)


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
    if ckpt.ema_tensors:
        save_file({k: v.contiguous() for k, v in ckpt.ema_tensors.items()}, str(tmp / "ema.safetensors"))
    if ckpt.downlink_tensors:
        save_file({k: v.contiguous() for k, v in ckpt.downlink_tensors.items()},
                  str(tmp / "downlink.safetensors"))
    meta = {"round": ckpt.round, "records": [dataclasses.asdict(r) for r in ckpt.records],
            "strategy_state": ckpt.strategy_state, "privacy_state": ckpt.privacy_state,
            "downlink_state": ckpt.downlink_state, "server_opt_state": ckpt.server_opt_state,
            "ema_state": ckpt.ema_state,
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


def record_attempt(run_dir: Path, server_round: int) -> None:
    """Append ``server_round`` to the checkpoint's attempt ledger, durably (fsync) and owner-only,
    before anything of that round attempt leaves the server (see the module docstring)."""
    path = Path(run_dir) / CHECKPOINT_DIR / ATTEMPTS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{int(server_round)}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _attempts(path: Path) -> list[int]:
    if not path.is_file():
        return []
    return [int(line) for line in path.read_text().split() if line.strip()]


def load_checkpoint(run_dir: Path) -> Checkpoint:
    path = run_dir / CHECKPOINT_DIR
    if not (path / "server.json").is_file():
        raise UsageError(f"--resume {str(run_dir)!r} has no checkpoint; it needs a run started with --checkpoint-every")
    meta = json.loads((path / "server.json").read_text())
    downlink = path / "downlink.safetensors"
    server_opt = path / "server_opt.safetensors"
    ema = path / "ema.safetensors"
    return Checkpoint(round=int(meta["round"]), global_state=load_file(str(path / "global.safetensors")),
                      records=[RoundRecord(**r) for r in meta["records"]],
                      strategy_state=meta["strategy_state"], privacy_state=meta["privacy_state"],
                      downlink_state=meta.get("downlink_state", {}),
                      downlink_tensors=load_file(str(downlink)) if downlink.is_file() else {},
                      server_opt_state=meta.get("server_opt_state", {}),
                      server_opt_tensors=load_file(str(server_opt)) if server_opt.is_file() else {},
                      ema_state=meta.get("ema_state", {}),
                      ema_tensors=load_file(str(ema)) if ema.is_file() else {},
                      streams=SecretStreams.load(path) if (path / KEY_FILE).is_file() else None,
                      published=([RoundRecord(**r) for r in meta["published"]]
                                 if meta.get("published") is not None else None),
                      attempts=_attempts(path / ATTEMPTS_FILE))


def restore_client_state(run_dir: Path, client_state: Path, keep: tuple[str, ...] = ()) -> None:
    """Put the per-client state back exactly as it was at the checkpoint, except the
    subdirectories named in ``keep``, which stay as they are now (under DP: ``accountants``,
    the privacy the clients have spent — also in round attempts after the checkpoint; it only
    grows, a resume never rewinds it)."""
    saved = run_dir / CHECKPOINT_DIR / "client_state"
    held = Path(f"{client_state}.keep")
    shutil.rmtree(held, ignore_errors=True)
    for name in keep:
        if (client_state / name).is_dir():
            held.mkdir(parents=True, exist_ok=True, mode=0o700)
            (client_state / name).rename(held / name)
    shutil.rmtree(client_state, ignore_errors=True)
    if saved.is_dir():
        shutil.copytree(saved, client_state)
    for name in keep:
        if (held / name).is_dir():
            client_state.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.rmtree(client_state / name, ignore_errors=True)
            (held / name).rename(client_state / name)
    shutil.rmtree(held, ignore_errors=True)
