"""Server checkpoints as a callback: save every K rounds, keep the DP attempt ledger, restore
on resume, drop the privacy key when the run is complete (:mod:`fedpeft.engine.checkpoint`
holds the files' format and the reasons)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from fedpeft.engine.callbacks.base import Callback
from fedpeft.engine.checkpoint import (CHECKPOINT_DIR, Checkpoint, record_attempt, restore_client_state,
                                       save_checkpoint)
from fedpeft.engine.client_state import client_state_dir
from fedpeft.engine.run import RoundContext, RunContext, ServerState
from fedpeft.privacy.randomness import discard_key


def snapshot(state: ServerState, server_round: int) -> Checkpoint:
    """``state`` after ``server_round`` as a :class:`Checkpoint`."""
    opt_state, opt_tensors = state.server_opt.state_dict()
    ema_state, ema_tensors = state.average.state_dict() if state.average is not None else ({}, {})
    return Checkpoint(
        round=server_round, global_state=state.global_state, records=state.records,
        strategy_state={"strategy": state.strategy.state_dict(), "stages": state.pipeline.state_dict()},
        privacy_state=state.privacy.state_dict(),
        downlink_state=state.downlink.state_dict(), downlink_tensors=state.downlink.tensors(),
        streams=state.streams, published=state.published,
        server_opt_state=opt_state, server_opt_tensors=opt_tensors, ema_state=ema_state, ema_tensors=ema_tensors)


def restore(state: ServerState, ckpt: Checkpoint) -> None:
    """Put ``ckpt`` back into ``state`` (a freshly built run's), so that the next round runs
    as it would have without the interruption (the checkpoint's ``streams`` were chosen when
    the run was built). Under DP with a secret key, the attempts after the checkpoint (its
    ledger) are accounted: each may have released a model."""
    state.global_state = {k: v.clone() for k, v in ckpt.global_state.items()}
    state.records = list(ckpt.records)
    state.published = list(ckpt.published) if ckpt.published is not None else list(ckpt.records)
    strategy_state: dict[str, Any] = ckpt.strategy_state
    if "accountant" in strategy_state:  # checkpoints written before the update pipeline (2026-11-30)
        strategy_state = {"stages": {"user-dp": strategy_state}}
    state.strategy.load_state_dict(dict(strategy_state.get("strategy", {})))
    state.pipeline.load_state_dict(dict(strategy_state.get("stages", {})))
    state.privacy.load_state_dict(ckpt.privacy_state)
    if state.privacy.fresh_attempts:  # attempts after the checkpoint may have released models
        state.privacy.add_attempts(len(ckpt.attempts))
    state.downlink.load_state_dict(ckpt.downlink_state, ckpt.downlink_tensors)
    if ckpt.server_opt_state:
        state.server_opt.load_state_dict(ckpt.server_opt_state, ckpt.server_opt_tensors)
    if state.average is not None:
        state.average.load_state_dict(ckpt.ema_state, ckpt.ema_tensors)


class CheckpointCallback(Callback):
    """Saves the server state and the per-client state to ``<output>/checkpoint`` after every
    ``every``-th round (0: never) and restores them when the run resumes one.

    Under DP with a secret key, every round attempt after the last checkpoint is appended to
    the checkpoint's ledger before the round's first message leaves (``before_round``), so a
    later resume accounts it. A fresh run starts without per-client state (never inheriting
    another run's residuals or accountants). When the run completes, its privacy key is
    deleted: nothing will resume it, so the server's secret does not stay beside the model.
    Place it last: a round is checkpointed once it has been reported.
    """

    def __init__(self, output: Path | None, every: int = 0) -> None:
        self.output = Path(output) if output is not None else None
        self.every = every
        #: append round attempts to the checkpoint's ledger (under DP, once a checkpoint exists)
        self.ledger = False

    def on_start(self, run: RunContext) -> None:
        client_state = client_state_dir(run.cfg, {})
        if run.resume is None:
            shutil.rmtree(client_state, ignore_errors=True)  # never inherit residuals/accountants
        else:
            restore(run.state, run.resume)
            # under DP the clients' accountants stay as they are: a resume never rewinds privacy spent
            keep = ("accountants",) if run.privacy.fresh_attempts else ()
            restore_client_state(self.output or Path("."), client_state, keep=keep)
        if self.output is not None:
            # per-client files are named by client id: who was ever sampled is private state,
            # not a result (owner-only, like the checkpoint)
            client_state.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(client_state, 0o700)
        self.ledger = (run.resume is not None and run.privacy.fresh_attempts and self.output is not None
                       and (self.output / CHECKPOINT_DIR).is_dir())

    def before_round(self, run: RunContext, server_round: int) -> None:
        if self.ledger and self.output is not None:
            record_attempt(self.output, server_round)

    def on_round(self, ctx: RoundContext) -> None:
        if self.output is None or not self.every or ctx.server_round % self.every:
            return
        save_checkpoint(self.output, snapshot(ctx.run.state, ctx.server_round), client_state_dir(ctx.run.cfg, {}))
        self.ledger = ctx.run.privacy.fresh_attempts

    def on_finish(self, run: RunContext) -> None:
        if self.output is not None:
            # the run is complete and its final model published (issue 24, finding 8)
            discard_key(self.output / CHECKPOINT_DIR)


__all__ = ["CheckpointCallback", "restore", "snapshot"]
