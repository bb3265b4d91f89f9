"""Checkpoint/resume equality, dropouts, stragglers and malformed updates (issue: reliability)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fedpeft.settings import resolve
from fedpeft.engine.checkpoint import load_checkpoint
from fedpeft.federation.client_app import app as honest_app
from fedpeft.federation.local_grid import LocalGrid
from fedpeft.federation.server import run_federation
from fedpeft.results import ResultsWriter
from fedpeft.simulation import simulate

TINY = dict(backend="inprocess", max_client_examples=16, max_test_examples=64, batch_size=8)


class _Crash(Exception):
    pass


class _CrashAfter:
    def __init__(self, n):
        self.n = n

    def on_start(self, config, plan):
        pass

    def on_round(self, record):
        if record.round == self.n:
            raise _Crash

    def on_finish(self, final):
        pass


def _strip(rounds):
    return [dataclasses.replace(r, wall_s=0.0) for r in rounds]


@pytest.mark.parametrize("extra", [{}, {"epsilon": 8.0, "compression": "compeft",
                                        "insecure_reproducible_noise": True},
                                   {"strategy": "flora", "compression": "stc", "compress_down": True},
                                   {"server_opt": "fedadam", "server_lr": 0.05},  # moments checkpointed
                                   {"epsilon": 8.0, "insecure_reproducible_noise": True, "ema": 0.8}])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, extra):
    base = {**TINY, "clients": 8, "cohort": 3, "rounds": 4, "checkpoint_every": 2, **extra}
    full_cfg = resolve({**base, "output": str(tmp_path / "full")})
    full = simulate(full_cfg, [ResultsWriter(tmp_path / "full")])

    cut_cfg = resolve({**base, "output": str(tmp_path / "cut")})
    with pytest.raises(_Crash):  # the process "dies" after round 3; last checkpoint is round 2
        simulate(cut_cfg, [ResultsWriter(tmp_path / "cut"), _CrashAfter(3)])
    ckpt = load_checkpoint(tmp_path / "cut")
    assert ckpt.round == 2
    resumed = simulate(cut_cfg, [ResultsWriter(tmp_path / "cut")], resume=ckpt)

    assert _strip(resumed.rounds) == _strip(full.rounds)
    assert resumed.final.epsilon == full.final.epsilon
    saved = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1, 2, 3, 4]


def test_resumed_copies_of_a_dp_run_keep_the_key_draw_fresh_noise_and_count_the_lost_attempt(tmp_path):
    """A DP run checkpointed after round 2 (secret key in checkpoint/privacy.key, mode 0600)
    dies after releasing round 3; copied, and both copies resumed: the key is kept, but each
    resume is a new attempt with its own noise, and the accountant counts the lost attempt at
    round 3 as well (issue 24, finding 4), so ε after the re-run round 3 is a straight run's
    ε after 4 rounds and the budget stops round 4."""
    import shutil
    import stat

    base = {**TINY, "clients": 8, "cohort": 3, "rounds": 4, "checkpoint_every": 2, "epsilon": 8.0}
    straight = simulate(resolve({**base, "output": str(tmp_path / "straight")}), [])
    cut_cfg = resolve({**base, "output": str(tmp_path / "cut")})
    with pytest.raises(_Crash):
        simulate(cut_cfg, [ResultsWriter(tmp_path / "cut"), _CrashAfter(3)])
    key = tmp_path / "cut" / "checkpoint" / "privacy.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    assert stat.S_IMODE((tmp_path / "cut" / "checkpoint").stat().st_mode) == 0o700
    assert load_checkpoint(tmp_path / "cut").attempts == [3]
    secret = key.read_bytes()  # the completed resume deletes the file (issue 24 #8)
    shutil.copytree(tmp_path / "cut", tmp_path / "copy")
    resumed = {}
    for name in ("cut", "copy"):
        cfg = dataclasses.replace(cut_cfg, output=str(tmp_path / name))
        resumed[name] = simulate(cfg, [ResultsWriter(tmp_path / name)], resume=load_checkpoint(tmp_path / name))
    # rounds 1-2 come from the checkpoint; round 3 was re-run with fresh noise in each copy
    assert _strip(resumed["cut"].unpublished[:2]) == _strip(resumed["copy"].unpublished[:2])
    assert resumed["cut"].unpublished[2].eval_loss != resumed["copy"].unpublished[2].eval_loss
    for name in ("cut", "copy"):
        eps = [r.epsilon for r in resumed[name].rounds]
        assert eps[:2] == [r.epsilon for r in straight.rounds[:2]]
        assert eps[2] == straight.rounds[3].epsilon          # 2 + the lost attempt + the re-run
        assert len(eps) == 3 and resumed[name].final.epsilon <= 8.0   # round 4 would pass ε
    # the key is in no published file
    for f in ("results.json", "rounds.csv"):
        text = (tmp_path / "cut" / f).read_bytes()
        assert secret not in text and secret.hex().encode() not in text
    assert not key.exists()


def test_dropout_aggregates_what_arrived(tmp_path):
    cfg = resolve({**TINY, "clients": 10, "cohort": 10, "rounds": 2, "dropout": 0.5,
                   "output": str(tmp_path / "d")})
    out = simulate(cfg, [])
    for r in out.rounds:
        assert r.clients_sampled == 10
        assert 0 < r.clients_failed < 10  # Binomial(10, 0.5): both extremes have p < 0.002
        # upload bytes are those of the clients that returned, each a full dense upload
        assert r.bytes_up == (10 - r.clients_failed) * (out.rounds[0].bytes_down // 10)


def test_stragglers_past_the_deadline_are_not_aggregated(tmp_path):
    cfg = resolve({**TINY, "clients": 6, "cohort": 6, "rounds": 1, "straggler_prob": 1.0,
                   "straggler_slowdown": 1e6, "deadline": 5.0, "output": str(tmp_path / "s")})
    out = simulate(cfg, [])
    r = out.rounds[0]
    assert r.stragglers == 6 and r.train_loss is None  # nothing aggregated


def _nan(state):
    k = next(iter(state))
    state[k][..., 0] = float("nan")
    return state


def _wrong_shape(state):
    k = next(iter(state))
    state[k] = torch.zeros(3, 3)
    return state


def _missing(state):
    state.pop(next(iter(state)))
    return state


def _int_dtype(state):
    k = next(iter(state))
    state[k] = state[k].to(torch.int32)
    return state


@pytest.mark.parametrize("poison,reason", [(_nan, "NaN"), (_wrong_shape, "shape"), (_missing, "missing keys"),
                                           (_int_dtype, "dtype")])
def test_malformed_update_is_rejected_and_does_not_poison(tmp_path, poison, reason, poisoning_app):
    cfg = resolve({**TINY, "clients": 4, "cohort": 4, "rounds": 1, "output": str(tmp_path / "p")})
    out = run_federation(LocalGrid(poisoning_app(poison), 4), cfg, [])
    r = out.rounds[0]
    assert r.rejected == 1 and reason in r.rejections[0] and r.rejections[0].startswith("client 0")
    assert r.eval_loss is not None and np.isfinite(r.eval_loss)
    assert r.bytes_up > 0


def test_huge_update_under_user_dp_moves_the_model_at_most_its_clipped_share(tmp_path, poisoning_app):
    """A client scaling its update by 1e6 shifts the DP aggregate by at most S / (qN)."""
    from fedpeft.engine.workspace import get_workspace

    base = {**TINY, "clients": 4, "cohort": 4, "rounds": 1, "noise_multiplier": 1e-9, "clip": 0.05}

    def boost(state):
        ws = get_workspace(resolve({**TINY}))
        g = ws.initial_state
        return {k: g[k] + 1e6 * (v - g[k]) for k, v in state.items()}

    outs = {}
    for name, app in (("honest", honest_app), ("poisoned", poisoning_app(boost))):
        cfg = resolve({**base, "output": str(tmp_path / name)})
        grid = LocalGrid(app, 4)
        states = []

        class Grab:
            def on_start(self, c, p): pass

            def on_round(self, rec):
                from fedpeft.engine.workspace import get_workspace as gw
                states.append({k: v.detach().clone() for k, v in gw(cfg).adapter.trainable_state(gw(cfg).model).items()})

            def on_finish(self, f): pass

        run_federation(grid, cfg, [Grab()])
        outs[name] = states[0]
    diff = torch.sqrt(sum(((outs["poisoned"][k].double() - outs["honest"][k].double()) ** 2).sum() for k in outs["honest"]))
    # both runs differ only in client 0's clipped update: ‖Δ‖ ≤ 2S / (q N) = 2 * 0.05 / 4
    assert 0 < float(diff) <= 2 * 0.05 / 4 + 1e-6
