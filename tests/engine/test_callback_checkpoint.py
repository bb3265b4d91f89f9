"""CheckpointCallback alone: saves after rounds K, 2K, ...; a resumed run restores the state
the checkpoint holds and then continues exactly as the uninterrupted run; per-client state
comes back as it was (under DP the clients' accountants as they are); the DP attempt ledger
counts every attempt after the last checkpoint; the privacy key goes when the run completes."""

from __future__ import annotations

import dataclasses

import torch
from callback_harness import new_run, play_round

from fedpeft.engine.callbacks import CheckpointCallback
from fedpeft.engine.checkpoint import ATTEMPTS_FILE, CHECKPOINT_DIR, load_checkpoint
from fedpeft.privacy.randomness import KEY_FILE


def _saved_round(out) -> int | None:
    return load_checkpoint(out).round if (out / CHECKPOINT_DIR / "server.json").is_file() else None


def test_checkpoints_are_written_after_rounds_k_and_2k_only(tmp_path):
    out = tmp_path / "run"
    run = new_run(out, rounds=7, checkpoint_every=3)
    callback = CheckpointCallback(out, every=3)
    callback.on_start(run)
    saved = []
    for r in range(1, 8):
        play_round(run, [callback], r)
        saved.append(_saved_round(out))
    assert saved == [None, None, 3, 3, 3, 6, 6]
    assert [rec.round for rec in load_checkpoint(out).records] == [1, 2, 3, 4, 5, 6]


def test_no_checkpoint_without_output_or_with_every_zero(tmp_path):
    out = tmp_path / "run"
    run = new_run(out, checkpoint_every=0)
    callback = CheckpointCallback(out, every=0)
    callback.on_start(run)
    for r in range(1, 4):
        play_round(run, [callback], r)
    assert not (out / CHECKPOINT_DIR).exists()


def _comparable(run) -> dict:
    """Everything of a run's server state, wall times left out (they measure the machine)."""
    state = run.state
    opt_meta, opt_tensors = state.server_opt.state_dict()
    ema_meta, ema_tensors = state.average.state_dict()
    return {"global": state.global_state, "records": [dataclasses.replace(r, wall_s=None) for r in state.records],
            "published": list(state.published), "strategy": state.strategy.state_dict(),
            "stages": state.pipeline.state_dict(), "privacy": state.privacy.state_dict(),
            "broadcast": (state.downlink.state_dict(), state.downlink.tensors()),
            "server_opt": (opt_meta, opt_tensors), "ema": (ema_meta, ema_tensors),
            "released": state.released_model()}


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_a_resume_restores_the_checkpointed_state_and_continues_as_if_never_stopped(tmp_path):
    out = tmp_path / "run"
    first = new_run(out, checkpoint_every=2)
    callback = CheckpointCallback(out, every=2)
    callback.on_start(first)
    client_file = out / "client_state" / "residuals" / "3.bin"  # what round r's clients keep
    client_file.parent.mkdir(parents=True)
    for r in (1, 2):
        client_file.write_bytes(f"after round {r}".encode())
        play_round(first, [callback], r)
    at_checkpoint = _comparable(first)
    client_file.write_bytes(b"after round 3")
    play_round(first, [callback], 3)

    resumed = new_run(out, checkpoint_every=2, resume=load_checkpoint(out))
    CheckpointCallback(out, every=2).on_start(resumed)
    _assert_same(_comparable(resumed), at_checkpoint)
    assert client_file.read_bytes() == b"after round 2"
    play_round(resumed, [CheckpointCallback(out, every=2)], 3)
    _assert_same(_comparable(resumed), _comparable(first))  # the server optimiser's moments, the EMA, ...


def test_a_fresh_run_starts_without_another_runs_client_state(tmp_path):
    out = tmp_path / "run"
    stale = out / "client_state" / "residuals" / "1.bin"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old run")
    CheckpointCallback(out, every=2).on_start(new_run(out))
    assert (out / "client_state").is_dir() and not stale.exists()
    assert (out / "client_state").stat().st_mode & 0o777 == 0o700  # who was sampled is private


def test_under_dp_every_attempt_after_the_checkpoint_is_in_the_ledger_and_accounted(tmp_path):
    out = tmp_path / "run"
    first = new_run(out, private=True, checkpoint_every=2)
    callback = CheckpointCallback(out, every=2)
    callback.on_start(first)
    for r in (1, 2):
        play_round(first, [callback], r)
    assert not (out / CHECKPOINT_DIR / ATTEMPTS_FILE).exists()  # a fresh run accounts its rounds itself
    for r in (3, 4, 5):  # attempts after the checkpoint of round 2 ... the process dies in round 5
        callback.before_round(first, r)
    assert load_checkpoint(out).attempts == [3, 4, 5]

    resumed = new_run(out, private=True, checkpoint_every=2, resume=load_checkpoint(out))
    again = CheckpointCallback(out, every=2)
    again.on_start(resumed)
    assert resumed.privacy.accounted == 3  # each lost attempt may have released a model
    play_round(resumed, [again], 3)
    play_round(resumed, [again], 4)  # checkpointed: its accountant holds every earlier attempt
    assert load_checkpoint(out).attempts == []
    again.before_round(resumed, 5)
    assert load_checkpoint(out).attempts == [5]


def test_under_dp_a_resume_keeps_the_clients_accountants_as_they_are(tmp_path):
    out = tmp_path / "run"
    first = new_run(out, private=True, checkpoint_every=1)
    callback = CheckpointCallback(out, every=1)
    callback.on_start(first)
    accountant = out / "client_state" / "accountants" / "2.json"
    accountant.parent.mkdir(parents=True)
    accountant.write_text("spent after round 1")
    play_round(first, [callback], 1)
    accountant.write_text("spent after round 2 attempt")  # privacy spent is never rewound
    resumed = new_run(out, private=True, checkpoint_every=1, resume=load_checkpoint(out))
    CheckpointCallback(out, every=1).on_start(resumed)
    assert accountant.read_text() == "spent after round 2 attempt"


def test_the_privacy_key_is_kept_for_a_resume_and_deleted_when_the_run_completes(tmp_path):
    out = tmp_path / "run"
    run = new_run(out, private=True, rounds=2, checkpoint_every=1)
    callback = CheckpointCallback(out, every=1)
    callback.on_start(run)
    for r in (1, 2):
        play_round(run, [callback], r)
    assert (out / CHECKPOINT_DIR / KEY_FILE).is_file()
    assert load_checkpoint(out).streams is not None
    callback.on_finish(run)
    assert not (out / CHECKPOINT_DIR / KEY_FILE).exists()
    assert load_checkpoint(out).round == 2  # the rest of the checkpoint stays
