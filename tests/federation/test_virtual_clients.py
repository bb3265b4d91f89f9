"""Virtual clients: a pool of workers serves any logical client the message names, and the
central evaluation split over workers equals the local one."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedpeft.config import RunConfig
from fedpeft.federation.central_eval import local_evaluator, sharded_evaluator
from fedpeft.federation.client_app import app
from fedpeft.records import from_record, to_record
from fedpeft.federation.virtual_grid import InProcessGrid
from fedpeft.engine.workspace import get_workspace

CFG = RunConfig(clients=50_000, cohort=4, rounds=1, max_client_examples=8, max_test_examples=150,
                backend="inprocess", seed=3)


def _train_message(ws, client: int, node: int = 1) -> Message:
    config = ConfigRecord({**CFG.to_client_flat(), "server-round": 1, "round-rank": 0, "client-id": client})
    return Message(RecordDict({"arrays": to_record(ws.initial_state), "config": config}),
                   dst_node_id=node, message_type=MessageType.TRAIN)


def test_a_worker_trains_the_client_the_message_names(tmp_path):
    cfg = dataclasses.replace(CFG, output=str(tmp_path))
    ws = get_workspace(cfg)
    grid = InProcessGrid(app, cfg.clients, num_workers=2)
    parts = ws.partitions(cfg.partition, cfg.clients, cfg.dirichlet_alpha, cfg.seed)
    with_data, empty = 3, 40_000  # IID over ~11.5k rows: clients beyond the rows are empty
    assert len(parts.indices(with_data)) == 1 and len(parts.indices(empty)) == 0
    replies = list(grid.send_and_receive([_train_message(ws, with_data, 1), _train_message(ws, empty, 2)]))
    assert [r.has_error() for r in replies] == [False, False]
    got = {int(r.content["metrics"]["client-id"]): r for r in replies}
    assert got[with_data].content["metrics"]["num-examples"] == 1
    assert got[empty].content["metrics"]["num-examples"] == 0
    # the empty client sends the broadcast back (a zero update), in the trained one's layout
    zero, trained = from_record(got[empty].content["arrays"]), from_record(got[with_data].content["arrays"])
    assert zero.keys() == trained.keys()
    assert all(torch.equal(zero[k], ws.initial_state[k]) for k in zero)
    assert any(not torch.equal(trained[k], ws.initial_state[k]) for k in trained)


def test_messages_must_name_an_existing_client():
    ws = get_workspace(CFG)
    grid = InProcessGrid(app, CFG.clients)
    bad = _train_message(ws, CFG.clients)  # one past the last client
    nameless = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                       message_type=MessageType.TRAIN)
    replies = list(grid.send_and_receive([bad, nameless]))
    assert all(r.has_error() for r in replies)
    assert "outside 0..49999" in replies[0].error.reason and "name their client" in replies[1].error.reason


@pytest.mark.parametrize("workers", [2, 3])
def test_sharded_evaluation_equals_local(workers):
    ws = get_workspace(CFG)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in ws.initial_state.items()}
    local = local_evaluator(ws)(state)
    sharded = sharded_evaluator(InProcessGrid(app, CFG.clients, num_workers=workers), CFG, ws, 60)(state)
    assert sharded.examples == local.examples == len(ws.test)
    assert sharded.accuracy == local.accuracy
    assert sharded.loss == pytest.approx(local.loss, rel=1e-6)


class _SlowBackend:
    """Stands in for Flower's RayBackend: one worker (so messages run in the order they were
    sent); client 1 answers only once the test releases it (bounded wait)."""

    num_workers = 1
    release = threading.Event()

    def __init__(self, backend_config):  # noqa: ANN001
        pass

    def build(self, app_fn):  # noqa: ANN001
        pass

    def process_message(self, msg, context):  # noqa: ANN001
        if context.node_config["partition-id"] == 1:
            assert self.release.wait(timeout=60), "the test never released client 1"
        client = int(context.node_config["partition-id"])
        return Message(RecordDict({"config": ConfigRecord({"client": client})}), reply_to=msg), context

    def terminate(self) -> None:
        pass


def test_ray_grid_drops_replies_that_arrive_after_the_round_timeout(monkeypatch):
    """A round that stops waiting gets the replies that arrived; the late one is neither
    returned then nor left behind for a later pull, nor handed to the next round."""
    from fedpeft.federation import virtual_grid

    monkeypatch.setattr("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", _SlowBackend)
    _SlowBackend.release.clear()
    grid = virtual_grid.RayGrid(app, 4, {})

    def msg(client: int) -> Message:
        return Message(RecordDict({"config": ConfigRecord({"client-id": client})}), dst_node_id=1,
                       message_type=MessageType.TRAIN)

    try:
        fast, late = msg(0), msg(1)
        replies = list(grid.send_and_receive([fast, late], timeout=2.0))
        assert [int(r.content["config"]["client"]) for r in replies] == [0]
        late_id = late.metadata.message_id  # the grid named the message when it sent it
        _SlowBackend.release.set()  # the late reply arrives now
        # the single worker runs messages in order: this round's reply comes after the late one
        # was handled, and it is the only reply the round gets
        (nxt,) = grid.send_and_receive([msg(2)], timeout=60)
        assert int(nxt.content["config"]["client"]) == 2
        assert list(grid.pull_messages([late_id])) == []  # dropped, not kept for a later pull
    finally:
        _SlowBackend.release.set()
        grid.close()
