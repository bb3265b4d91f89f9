"""EvaluateCallback alone: which rounds are scored (--eval-every k, and always the last), which
model is scored (the iterate average under --ema), validation at the same rounds on the same
model, and unscored rounds' fields left null."""

from __future__ import annotations

import pytest
import torch
from callback_harness import new_run, play_round

from fedpeft.engine.callbacks import EvaluateCallback
from fedpeft.training.evaluate import EvalResult


class Scorer:
    """An evaluator that keeps every state it was given and scores it by a known function."""

    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.seen: list[dict[str, torch.Tensor]] = []

    def __call__(self, state):
        self.seen.append({k: v.clone() for k, v in state.items()})
        return EvalResult(loss=self.offset + float(state["b"].sum()), accuracy=0.5 + self.offset, examples=10)


def test_every_kth_round_and_the_last_are_scored_and_the_others_are_null(tmp_path):
    run = new_run(tmp_path / "run", rounds=7)
    test, validation = Scorer(0.0), Scorer(0.25)
    callback = EvaluateCallback(test, validation, every=3)
    records = [play_round(run, [callback], r).record for r in range(1, 8)]
    scored = [r.round for r in records if r.eval_loss is not None]
    assert scored == [3, 6, 7]
    assert len(test.seen) == len(validation.seen) == 3
    for record in records:
        if record.round in scored:
            assert record.eval_accuracy == 0.5 and record.validation_accuracy == 0.75
        else:
            assert (record.eval_loss, record.eval_accuracy, record.eval_perplexity,
                    record.validation_loss, record.validation_accuracy) == (None,) * 5
    # validation scores the very model the test split scored
    for t, v in zip(test.seen, validation.seen):
        assert all(torch.equal(t[k], v[k]) for k in t)


def test_the_scored_model_is_the_bias_corrected_ema_of_the_iterates(tmp_path):
    run = new_run(tmp_path / "run", rounds=3)  # IterateAverage(0.5)
    test = Scorer(0.0)
    iterates = []
    for r in (1, 2, 3):
        play_round(run, [EvaluateCallback(test, every=1)], r)
        iterates.append({k: v.clone() for k, v in run.state.global_state.items()})
    for t in (1, 2, 3):  # weights 0.5^(t-i), normalised
        weights = [0.5 ** (t - i) for i in range(1, t + 1)]
        for key, got in test.seen[t - 1].items():
            want = sum(w * iterates[i][key].double() for i, w in enumerate(weights)) / sum(weights)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(test.seen[-1]["b"], iterates[-1]["b"])


def test_without_validation_rows_only_the_test_split_is_scored(tmp_path):
    run = new_run(tmp_path / "run", rounds=1)
    record = play_round(run, [EvaluateCallback(Scorer(0.0))], 1).record
    assert record.eval_accuracy == 0.5
    assert record.validation_loss is None and record.validation_accuracy is None


def test_an_evaluation_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        EvaluateCallback(Scorer(0.0), every=0)
