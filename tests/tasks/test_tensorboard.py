"""``--tensorboard DIR``: the numbers of rounds.csv as TensorBoard scalars, read back with
tensorboard's own EventAccumulator; under DP only what rounds.csv publishes; a resumed run
shows each round once; without the package, a one-line error saying how to install it."""

from __future__ import annotations

import csv
import sys

import pytest

from fedpeft.cli import main
from fedpeft.errors import UsageError
from fedpeft.reporting import optional_reporters
from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve
from fedpeft.simulation import simulate


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _published(run_dir) -> dict[str, list[tuple[int, float]]]:
    """rounds.csv's non-empty numeric cells, column -> [(round, value)]."""
    with (run_dir / "rounds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, cell in row.items():
            if key in ("round", "rejections") or cell == "":
                continue
            out.setdefault(key, []).append((int(row["round"]), float(cell)))
    return out


def _assert_same(logged: list[tuple[int, float]], points: list[tuple[int, float]], tag: str) -> None:
    """Same rounds, same values (events hold float32)."""
    assert [s for s, _ in logged] == [s for s, _ in points], tag
    assert [v for _, v in logged] == pytest.approx([v for _, v in points], rel=1e-6), tag


def _run(settings: dict, tmp_path, reporters_extra=()):
    cfg = resolve({**settings, "output": str(tmp_path / "run"), "tensorboard": str(tmp_path / "tb")})
    simulate(cfg, [ResultsWriter(cfg.output), *optional_reporters(cfg), *reporters_extra])
    return cfg


def _lm(tiny_lm, **kw):
    model, data = tiny_lm
    return {"task": "causal-lm", "model": str(model), "dataset": str(data), "backend": "inprocess", "clients": 3,
            "cohort": 3, "rounds": 2, "lr": 1e-2, "batch_size": 4, "max_client_examples": 0, **kw}


@pytest.mark.parametrize("dp", [{}, {"epsilon": 8.0}], ids=["no-dp", "user-dp"])
def test_a_causal_lm_run_logs_the_rounds_csv_numbers(tiny_lm, tmp_path, dp):
    _run(_lm(tiny_lm, **dp), tmp_path)
    logged, published = _scalars(tmp_path / "tb" / "run"), _published(tmp_path / "run")
    assert set(logged) == set(published)
    for tag, points in published.items():
        _assert_same(logged[tag], points, tag)
    assert {"eval_loss", "eval_perplexity", "bytes_up"} <= set(logged)
    if dp:  # client-reported statistics are not published under DP: not in TensorBoard either
        assert {"epsilon"} <= set(logged)
        assert not {"train_loss", "clients_sampled", "clients_failed"} & set(logged)
    else:
        assert {"train_loss", "clients_sampled"} <= set(logged) and "epsilon" not in logged


def test_a_classification_run_logs_the_rounds_csv_numbers(small_csv, tmp_path):
    _run({"dataset": str(small_csv), "backend": "inprocess", "clients": 4, "cohort": 2, "rounds": 2,
          "max_client_examples": 16, "max_test_examples": 24, "batch_size": 8}, tmp_path)
    logged, published = _scalars(tmp_path / "tb" / "run"), _published(tmp_path / "run")
    assert set(logged) == set(published) and "eval_accuracy" in logged and "eval_perplexity" not in logged
    for tag, points in published.items():
        _assert_same(logged[tag], points, tag)


class _Died(Exception):
    pass


class _DieInRound2:
    def on_start(self, config, plan):  # noqa: ANN001
        pass

    def on_round(self, record):  # noqa: ANN001
        if record.round == 2:
            raise _Died

    def on_finish(self, final):  # noqa: ANN001
        pass


def test_a_resumed_run_shows_each_round_once_with_the_resumed_values(tiny_lm, tmp_path):
    """The interrupted attempt logged round 2 before dying; the resume replays round 1 and runs
    round 2 again: TensorBoard shows rounds 1 and 2 once each, with rounds.csv's values."""
    with pytest.raises(_Died):
        _run(_lm(tiny_lm, checkpoint_every=1), tmp_path, [_DieInRound2()])
    assert [s for s, _ in _scalars(tmp_path / "tb" / "run")["eval_loss"]] == [1, 2]  # the lost attempt's round 2
    assert main(["simulate", "--resume", str(tmp_path / "run")]) == 0
    logged, published = _scalars(tmp_path / "tb" / "run"), _published(tmp_path / "run")
    assert set(logged) == set(published)
    for tag, points in published.items():
        assert [s for s, _ in points] == [1, 2], tag
        _assert_same(logged[tag], points, tag)


def test_without_the_tensorboard_package_the_flag_is_refused_in_one_line(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails
    with pytest.raises(UsageError) as err:
        resolve(_lm(tiny_lm, tensorboard=str(tmp_path / "tb")))
    assert str(err.value) == (f"--tensorboard {str(tmp_path / 'tb')!r} needs the tensorboard package, which is not "
                              "installed; install it with: pip install 'fedpeft[tensorboard]' (or pip install "
                              "tensorboard)")
    assert resolve(_lm(tiny_lm)).tensorboard is None  # without the flag nothing needs it
