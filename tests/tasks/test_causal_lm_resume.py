"""Checkpoint/resume on ``--task causal-lm``: a run whose process dies after its round-1
checkpoint, continued with ``fedpeft simulate --resume``, ends where the uninterrupted run ends."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedpeft.cli import main
from fedpeft.engine.checkpoint import load_checkpoint
from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve
from fedpeft.simulation import simulate


class _Died(Exception):
    pass


class _DieInRound:
    """A reporter that raises while round ``n`` is being reported (after round n-1's checkpoint)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_start(self, config, plan) -> None:  # noqa: ANN001
        pass

    def on_round(self, record) -> None:  # noqa: ANN001
        if record.round == self.n:
            raise _Died

    def on_finish(self, final) -> None:  # noqa: ANN001
        pass


def test_a_causal_lm_run_interrupted_after_round_1_and_resumed_equals_the_uninterrupted_run(tiny_lm, tmp_path):
    model, data = tiny_lm
    # cohort 2 of 4: the resumed round 2 must draw the same clients as the uninterrupted one
    base = {"task": "causal-lm", "model": str(model), "dataset": str(data), "backend": "inprocess",
            "clients": 4, "cohort": 2, "rounds": 2, "lr": 1e-2, "batch_size": 4, "max_client_examples": 0,
            "checkpoint_every": 1}
    full_cfg = resolve({**base, "output": str(tmp_path / "full")})
    full = simulate(full_cfg, [ResultsWriter(full_cfg.output)])

    cut_cfg = resolve({**base, "output": str(tmp_path / "cut")})
    with pytest.raises(_Died):
        simulate(cut_cfg, [ResultsWriter(cut_cfg.output), _DieInRound(2)])
    assert load_checkpoint(tmp_path / "cut").round == 1
    assert main(["simulate", "--resume", str(tmp_path / "cut")]) == 0

    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert resumed["config"]["task"] == "causal-lm"
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    # round 2 after the resume is computed afresh from the checkpoint, not copied from anywhere
    assert resumed["final"]["eval_loss"] == pytest.approx(full.final.eval_loss, abs=1e-6)
    assert resumed["final"]["perplexity"] == pytest.approx(full.final.perplexity, rel=1e-6)
    for mine, theirs in zip(resumed["rounds"], full.rounds):
        theirs = dataclasses.asdict(theirs)
        for key in ("clients_sampled", "train_loss", "eval_loss", "bytes_up", "bytes_down"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-6), key
    # the round that ran twice actually trained: the model moved from round 1's
    assert full.rounds[1].eval_loss != full.rounds[0].eval_loss
