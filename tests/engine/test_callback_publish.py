"""PublishCallback alone, against fedpeft.privacy.publication's documented policy: under DP a
round is published with the covered fields only (evaluation, validation, ε, rank) and planned
byte counts (expected cohort × one dense payload), the plan without the data's size, and no
log line names a client; without DP everything is published as is."""

from __future__ import annotations

import time

import pytest
from callback_harness import new_run

from fedpeft.engine.callbacks import PublishCallback
from fedpeft.engine.run import RoundContext, RoundResult
from fedpeft.privacy.publication import Publication
from fedpeft.results import RoundRecord

FULL = RoundRecord(
    round=3, clients_sampled=5, train_loss=0.42, eval_loss=0.61, eval_accuracy=0.7, bytes_up=1234,
    bytes_down=2345, aggregation_error=0.01, epsilon=1.5, rank=4, wall_s=2.5, clients_failed=1, stragglers=1,
    rejected=1, rejections=["client 7: too big"], personalized_accuracy=0.8, personalized_majority=0.6,
    worker_nodes=2, reported_epsilon_max=1.9, eval_perplexity=None, aggregation_error_outside_span=0.3,
    validation_loss=0.65, validation_accuracy=0.69)
RESULT = RoundResult(server_round=3, started=time.perf_counter(), rank=4, metrics={}, clients_sampled=5,
                     clients_failed=1, rejections=[(7, "too big")], bytes_down=None, dense_up=100, dense_down=150)
PLAN = {"clients": 8, "train_examples": 1234, "validation_examples": 120, "rounds": 5,
        "utility": {"examples_per_round": 600, "data_warnings": ["few rows"], "predicted_seconds": 80.0,
                    "predicted_accuracy": 0.7}}


def _publish(tmp_path, private: bool):
    run = new_run(tmp_path / "run", private=private, cohort=4)
    run.plan = dict(PLAN)
    warnings: list[str] = []
    callback = PublishCallback(Publication(private, run.cfg.cohort), warn=warnings.append)
    callback.on_start(run)
    ctx = RoundContext(run, RESULT, FULL)
    callback.on_round(ctx)
    return run, ctx, warnings


def test_under_dp_only_the_covered_fields_and_planned_bytes_are_published(tmp_path):
    run, ctx, _ = _publish(tmp_path, private=True)
    assert ctx.published == RoundRecord(
        round=3, clients_sampled=None, train_loss=None, eval_loss=0.61, eval_accuracy=0.7,
        bytes_up=4 * 100, bytes_down=4 * 150,  # expected cohort q·N = 4 × one dense payload
        aggregation_error=None, epsilon=1.5, rank=4, wall_s=None, clients_failed=None, stragglers=None,
        rejected=None, rejections=None, personalized_accuracy=None, personalized_majority=None,
        worker_nodes=None, reported_epsilon_max=None, eval_perplexity=None,
        aggregation_error_outside_span=None, validation_loss=0.65, validation_accuracy=0.69)
    assert run.state.published == [ctx.published]
    assert ctx.record == FULL  # the full record stays for the checkpoint and --diagnostics


def test_under_dp_the_plan_leaves_out_the_datas_size(tmp_path):
    run, _, _ = _publish(tmp_path, private=True)
    assert run.published_plan == {"clients": 8, "rounds": 5, "utility": {"predicted_accuracy": 0.7}}
    assert run.plan == PLAN


def test_under_dp_no_log_line_names_a_client_or_the_cohort(tmp_path):
    assert _publish(tmp_path, private=True)[2] == []


def test_without_dp_everything_is_published_and_failures_are_logged(tmp_path):
    run, ctx, warnings = _publish(tmp_path, private=False)
    assert ctx.published == FULL and run.published_plan == PLAN
    assert warnings == ["round 3: 1 of 5 sampled clients failed or timed out; aggregating the 4 replies",
                        "rejected update of client 7: too big"]


@pytest.mark.parametrize("private", [True, False])
def test_each_round_is_published_once_in_order(tmp_path, private):
    run = new_run(tmp_path / "run", private=private)
    callback = PublishCallback(Publication(private, 4), warn=lambda _: None)
    callback.on_start(run)
    for r in (1, 2, 3):
        record = RoundRecord(round=r, clients_sampled=4, train_loss=0.1, eval_loss=None, eval_accuracy=None,
                             bytes_up=10, bytes_down=20, aggregation_error=None, epsilon=None, rank=None, wall_s=1.0)
        callback.on_round(RoundContext(run, RESULT, record))
    assert [p.round for p in run.state.published] == [1, 2, 3]
