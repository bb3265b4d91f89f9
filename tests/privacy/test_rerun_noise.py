"""A re-run round never reuses its noise (issue 24, finding 4).

The audit's reproducer: a user-level DP run checkpointed after round 1 dies after releasing
round 2; its checkpoint is resumed twice, and in one resume a client drops out of round 2.
When round 2's noise was derived from (key, round) alone, both resumes added the same noise,
so (model_A − model_B) · qN was exactly the dropped client's clipped update (cosine 1.000000).
Now each attempt draws fresh noise, the difference is dominated by noise, and the accountant
counts every attempt. With --insecure-reproducible-noise the resumes stay reproducible.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from flwr.clientapp import ClientApp

from fedpeft.federation.central_eval import local_evaluator
from fedpeft.engine.checkpoint import load_checkpoint, restore_client_state
from fedpeft.federation.client_app import app as honest_app
from fedpeft.federation.local_grid import LocalGrid
from fedpeft.federation.server import run_federation
from fedpeft.privacy.accounting import make_accountant
from fedpeft.privacy.mechanisms import clip_by_l2
from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve
from fedpeft.updates import client_delta

CLIENTS = 4
# q = 1: every client is in every round, so the two resumes differ only in who returned
BASE = dict(backend="inprocess", max_client_examples=16, max_test_examples=32, batch_size=8,
            clients=CLIENTS, cohort=CLIENTS, rounds=2, checkpoint_every=1, dp="user",
            noise_multiplier=1.0, clip=0.5, delta=1e-3)


class _Crash(Exception):
    pass


class _CrashAfter:
    """The process "dies" once round ``n`` is published (before its checkpoint)."""

    def __init__(self, n):
        self.n = n

    def on_start(self, config, plan):
        pass

    def on_round(self, record):
        if record.round == self.n:
            raise _Crash

    def on_finish(self, final):
        pass


def _app(drop_round=None, grabbed=None):
    """The honest ClientApp; partition 0 fails in ``drop_round`` (a dropout) or has its
    upload recorded in ``grabbed``."""
    app = ClientApp()

    @app.query()
    def query(msg, context):
        return honest_app(msg, context)

    @app.train()
    def train(msg, context):
        first = int(context.node_config["partition-id"]) == 0
        rnd = int(msg.content["config"]["server-round"])
        if first and rnd == drop_round:
            raise RuntimeError("client 0 dropped out")
        reply = honest_app(msg, context)
        if first and grabbed is not None and not reply.has_error():
            grabbed[rnd] = {k: torch.from_numpy(a.numpy().copy()) for k, a in reply.content["arrays"].items()}
        return reply

    return app


def _models(store):
    def factory(ws):
        evaluate = local_evaluator(ws)

        def run(state):
            store.append({k: v.detach().clone() for k, v in state.items()})
            return evaluate(state)
        return run
    return factory


def _two_resumes(tmp_path, **extra):
    """Crash after round 2, copy the run, resume A (every client) and B (client 0 drops out
    of round 2). Returns the checkpoint, both published round-2 models, client 0's round-2
    upload in A and both outcomes."""
    cfg = resolve({**BASE, **extra, "output": str(tmp_path / "cut")})
    with pytest.raises(_Crash):
        run_federation(LocalGrid(honest_app, CLIENTS), cfg, [ResultsWriter(tmp_path / "cut"), _CrashAfter(2)])
    ckpt = load_checkpoint(tmp_path / "cut")
    assert ckpt.round == 1
    models, outcomes, grabbed = {}, {}, {}
    for name, app in (("A", _app(grabbed=grabbed)), ("B", _app(drop_round=2)), ("A2", _app())):
        shutil.copytree(tmp_path / "cut", tmp_path / name)
        run_cfg = dataclasses.replace(cfg, output=str(tmp_path / name))
        store = []
        outcomes[name] = run_federation(LocalGrid(app, CLIENTS), run_cfg, [],
                                        resume=load_checkpoint(tmp_path / name), evaluator=_models(store))
        models[name] = store[-1]
    assert outcomes["B"].unpublished[-1].clients_failed == 1
    return ckpt, models, grabbed[2], outcomes


def _cosine(a, b):
    a = torch.cat([v.double().flatten() for v in a.values()])
    b = torch.cat([v.double().flatten() for v in b.values()])
    return float(a @ b / (a.norm() * b.norm()))


def test_two_resumes_with_different_dropouts_do_not_reveal_the_dropped_clients_update(tmp_path):
    ckpt, models, upload, outcomes = _two_resumes(tmp_path)
    clipped, _ = clip_by_l2(client_delta(ckpt.global_state, upload), BASE["clip"])
    qn = float(BASE["cohort"])
    diff = {k: (models["A"][k].double() - models["B"][k].double()) * qn for k in clipped}
    cos = _cosine(diff, clipped)
    # same noise (the old derivation) gives cos = 1.000000; fresh noise of norm ~ z·S·sqrt(2d)
    # against ||clipped|| <= S leaves a cosine near 1/sqrt(2d)
    assert cos < 0.2, f"difference of the two releases aligns with the dropped update (cos {cos:.6f})"
    # two resumes with the SAME replies still differ: every attempt draws its own noise
    assert any(not torch.equal(models["A"][k], models["A2"][k]) for k in models["A"])
    # the accountant counts the crashed attempt at round 2 and its re-run: 3 mechanisms
    ref = make_accountant("rdp")
    ref.step(BASE["noise_multiplier"], 1.0, 3)
    for name in ("A", "B", "A2"):
        assert outcomes[name].final.epsilon == pytest.approx(ref.epsilon(BASE["delta"]), rel=1e-9)
    straight = make_accountant("rdp")
    straight.step(BASE["noise_multiplier"], 1.0, 2)
    assert outcomes["A"].final.epsilon > straight.epsilon(BASE["delta"])


def test_reproducible_noise_resumes_stay_reproducible(tmp_path):
    """--insecure-reproducible-noise: two resumes with the same replies publish the same model
    and ε (the run's documented lack of a guarantee includes re-run rounds)."""
    _, models, _, outcomes = _two_resumes(tmp_path, insecure_reproducible_noise=True)
    assert all(torch.equal(models["A"][k], models["A2"][k]) for k in models["A"])
    assert outcomes["A"].final.epsilon == outcomes["A2"].final.epsilon
    straight = make_accountant("rdp")
    straight.step(BASE["noise_multiplier"], 1.0, 2)
    assert outcomes["A"].final.epsilon == pytest.approx(straight.epsilon(BASE["delta"]), rel=1e-9)


def test_a_resume_never_rewinds_the_clients_accountants(tmp_path):
    """Sample-level: the clients' accountants hold what every attempt spent; restoring the
    checkpoint's client state keeps them, and rewinds everything else."""
    run = tmp_path / "run"
    saved = run / "checkpoint" / "client_state"
    (saved / "accountants").mkdir(parents=True)
    (saved / "accountants" / "3.json").write_text("old")
    (saved / "residuals").mkdir()
    (saved / "residuals" / "3.safetensors").write_text("old")
    live = run / "client_state"
    (live / "accountants").mkdir(parents=True)
    (live / "accountants" / "3.json").write_text("spent after the checkpoint")
    (live / "residuals").mkdir()
    (live / "residuals" / "3.safetensors").write_text("new")
    restore_client_state(run, live, keep=("accountants",))
    assert (live / "accountants" / "3.json").read_text() == "spent after the checkpoint"
    assert (live / "residuals" / "3.safetensors").read_text() == "old"
    restore_client_state(run, live)
    assert (live / "accountants" / "3.json").read_text() == "old"
