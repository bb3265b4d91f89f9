"""ReportCallback alone: every reporter gets the plan, each round and the final record of its
view (published, or full for the --diagnostics file); a resumed run replays the checkpoint's
rounds in that view first; the published view needs the publish callback before it."""

from __future__ import annotations

import dataclasses

import pytest
from callback_harness import new_run, play_round

from fedpeft.engine.callbacks import PublishCallback, ReportCallback
from fedpeft.engine.checkpoint import Checkpoint
from fedpeft.privacy.publication import Publication
from fedpeft.results import RoundRecord


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_start(self, config, plan) -> None:
        self.events.append(("start", config["clients"], plan))

    def on_round(self, record) -> None:
        self.events.append(("round", record))

    def on_finish(self, final) -> None:
        self.events.append(("finish", final))


def _record(r: int, **kw) -> RoundRecord:
    return RoundRecord(**{"round": r, "clients_sampled": 4, "train_loss": 0.5, "eval_loss": 0.6, "eval_accuracy": 0.7,
                          "bytes_up": 1000, "bytes_down": 2000, "aggregation_error": None, "epsilon": None,
                          "rank": None, "wall_s": 1.0, **kw})


def _run_two_rounds(tmp_path, private: bool, resume=None):
    run = new_run(tmp_path / "run", private=private, rounds=2, resume=resume)
    run.plan = {"clients": 8, "train_examples": 99}
    published, second, full = Recorder(), Recorder(), Recorder()
    callbacks = [PublishCallback(Publication(private, 4), warn=lambda _: None),
                 ReportCallback([published, second]), ReportCallback([full], full=True)]
    for callback in callbacks:
        callback.on_start(run)
    for r in range(len(resume.records) + 1 if resume else 1, 3):
        play_round(run, callbacks, r, metrics={"train-loss": 0.3, "bytes-up": 300.0, "bytes-down": 500.0})
    run.wall_s = 12.0
    for callback in callbacks:
        callback.on_finish(run)
    return run, published, second, full


def test_every_reporter_sees_the_published_run_and_the_full_view_the_full_one(tmp_path):
    run, published, second, full = _run_two_rounds(tmp_path, private=True)
    assert published.events == second.events
    kinds = [e[0] for e in published.events]
    assert kinds == ["start", "round", "round", "finish"] == [e[0] for e in full.events]
    assert published.events[0] == ("start", 8, {"clients": 8})  # the data's size is not published
    assert full.events[0] == ("start", 8, {"clients": 8, "train_examples": 99})
    assert [e[1] for e in published.events[1:3]] == run.state.published
    assert [e[1] for e in full.events[1:3]] == run.state.records
    assert all(e[1].train_loss is None for e in published.events[1:3])
    assert all(e[1].train_loss is not None for e in full.events[1:3])
    public_final, full_final = published.events[-1][1], full.events[-1][1]
    assert public_final.bytes_up_total == 2 * 4 * 100  # planned: expected cohort × dense upload, 2 rounds
    assert full_final.bytes_up_total == 2 * 300  # what the clients actually sent
    assert public_final.wall_s == full_final.wall_s == 12.0


def test_a_resumed_run_replays_the_checkpoints_rounds_in_each_view_first(tmp_path):
    kept = [_record(1)]
    public = [dataclasses.replace(kept[0], train_loss=None, clients_sampled=None)]
    resume = Checkpoint(round=1, global_state={}, records=kept, strategy_state={}, privacy_state={},
                        published=public)
    _, published, _, full = _run_two_rounds(tmp_path, private=True, resume=resume)
    assert published.events[1] == ("round", public[0])
    assert full.events[1] == ("round", kept[0])
    assert [e[1].round for e in published.events if e[0] == "round"] == [1, 2]


def test_a_checkpoint_without_published_records_replays_its_records_to_both_views(tmp_path):
    resume = Checkpoint(round=1, global_state={}, records=[_record(1)], strategy_state={}, privacy_state={})
    _, published, _, full = _run_two_rounds(tmp_path, private=False, resume=resume)
    assert published.events[1] == full.events[1] == ("round", _record(1))


def test_the_published_view_without_a_publish_callback_is_refused(tmp_path):
    with pytest.raises(ValueError, match="PublishCallback"):
        ReportCallback([Recorder()]).on_start(new_run(tmp_path / "run"))
