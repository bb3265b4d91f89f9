"""The order default_callbacks gives is part of the contract: a round is checkpointed only once
every reporter has seen it; when the run finishes the model is exported before the reporters
finish, and the privacy key is deleted after them; --diagnostics gets the full records."""

from __future__ import annotations

import json

import pytest
from callback_harness import new_run, play_round

from fedpeft.engine.callbacks import default_callbacks
from fedpeft.engine.checkpoint import CHECKPOINT_DIR, load_checkpoint
from fedpeft.privacy.publication import DIAGNOSTICS_FILE
from fedpeft.privacy.randomness import KEY_FILE
from fedpeft.training.evaluate import EvalResult


def _score(state):
    return EvalResult(loss=1.0, accuracy=0.5, examples=10)


class CrashIn:
    def __init__(self, server_round: int) -> None:
        self.server_round = server_round

    def on_start(self, config, plan) -> None:
        pass

    def on_round(self, record) -> None:
        if record.round == self.server_round:
            raise RuntimeError("reporter died")

    def on_finish(self, final) -> None:
        pass


def test_a_round_is_checkpointed_only_after_every_reporter_saw_it(tmp_path):
    out = tmp_path / "run"
    run = new_run(out, checkpoint_every=1)
    callbacks = default_callbacks(run.cfg, [CrashIn(2)], private=False, test=_score)
    for callback in callbacks:
        callback.on_start(run)
    play_round(run, callbacks, 1)
    with pytest.raises(RuntimeError, match="reporter died"):
        play_round(run, callbacks, 2)
    assert load_checkpoint(out).round == 1


def test_at_the_end_the_model_is_exported_before_reporters_finish_and_the_key_goes_last(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr("fedpeft.engine.callbacks.export.export_model",
                        lambda ws, state, cfg, d: (d.mkdir(parents=True), (d / "adapter_model.safetensors").touch()))
    seen_at_finish = {}

    class AtFinish:
        def on_start(self, config, plan) -> None:
            pass

        def on_round(self, record) -> None:
            pass

        def on_finish(self, final) -> None:
            seen_at_finish["model"] = (out / "model" / "adapter_model.safetensors").is_file()
            seen_at_finish["key"] = (out / CHECKPOINT_DIR / KEY_FILE).is_file()

    run = new_run(out, private=True, rounds=2, checkpoint_every=1, diagnostics=True)
    callbacks = default_callbacks(run.cfg, [AtFinish()], private=True, test=_score)
    for callback in callbacks:
        callback.on_start(run)
    for r in (1, 2):
        play_round(run, callbacks, r)
    for callback in callbacks:
        callback.on_finish(run)
    assert seen_at_finish == {"model": True, "key": True}
    assert not (out / CHECKPOINT_DIR / KEY_FILE).exists()
    diagnostics = json.loads((out / DIAGNOSTICS_FILE).read_text())
    assert diagnostics["covered_by_dp"] is False
    assert [r["train_loss"] for r in diagnostics["rounds"]] == [0.1, 0.2]  # the full records
    assert [r["eval_accuracy"] for r in diagnostics["rounds"]] == [0.5, 0.5]
