"""A deployed node's DP policy is its own (issue 24, finding 3).

A hostile server writes the run config of every train message. Against a node whose node
config says ``dp = "sample"`` (with a z floor, δ ceiling and ε budget), a message asking for
z = 1e-6, no DP-SGD, seeded noise, a larger δ or ε is refused — the ClientApp raises, the node
logs why — and a foreign ``output`` path never becomes a path on the node: the accountant lives
in the node's ``state-dir`` and persists across runs. In simulation the run's config is the
policy, so the same message is obeyed there.

Runs the real ClientApp ``train`` handler on the embedded model (12 examples, 3 DP-SGD steps).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpeft.config import RunConfig
from fedpeft.errors import UsageError
from fedpeft.records import to_record
from fedpeft.engine.workspace import get_workspace

#: Message() outside a Flower runtime needs a task identity (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("flower_task_identity")

N_EXAMPLES, BATCH, DELTA, CLIENT = 12, 4, 1e-5, 2
CFG = RunConfig(clients=50, cohort=5, rounds=2, batch_size=BATCH, max_client_examples=N_EXAMPLES,
                max_length=32, max_test_examples=64, dp="sample", noise_multiplier=1.0,
                sample_clip=1.0, seed=0, output="runs/honest")
#: the node's own policy: sample-level only, z >= 0.8, δ <= 1e-5, ε <= 20 over all its runs
POLICY = {"dp": "sample", "dp-noise-multiplier": 0.8, "dp-delta": DELTA, "dp-epsilon": 20.0}


@pytest.fixture(scope="module")
def ws():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield get_workspace(CFG)
    torch.set_num_threads(threads)


def _train(ws, node_config: dict, server_round: int = 1, delta: float = DELTA, **overrides):
    """The ClientApp's train handler on a message the server wrote with ``overrides``."""
    from fedpeft.federation.client_app import train

    flat = CFG.with_changes(**overrides).to_client_flat()
    config = ConfigRecord({**flat, "server-round": server_round, "round-rank": 0, "dp-delta": delta})
    msg = Message(RecordDict({"arrays": to_record(ws.initial_state), "config": config}),
                  dst_node_id=0, message_type="train")
    ctx = Context(run_id=1, node_id=0, state=RecordDict(), run_config={},
                  node_config={"partition-id": CLIENT, "num-partitions": CFG.clients, **node_config})
    return dict(train(msg, ctx).content["metrics"])


def _node_log():
    class Lines(logging.Handler):
        lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    handler = Lines()
    logging.getLogger("flwr").addHandler(handler)
    return handler


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.parametrize("what,overrides,match", [
    ("z = 1e-6", {"noise_multiplier": 1e-6}, "noise multiplier 1e-06, below this node's floor"),
    ("no DP-SGD at all", {"dp": "none", "noise_multiplier": None}, "trains only with sample-level"),
    ("user-level instead", {"dp": "user", "noise_multiplier": None, "epsilon": 2.0},
     "trains only with sample-level"),
    ("seeded noise", {"insecure_reproducible_noise": True}, "insecure reproducible"),
    ("a larger delta", {"delta_message": 0.01}, "delta 0.01, above this node's dp-delta"),
    ("epsilon past the node's budget", {"noise_multiplier": None, "epsilon": 50.0},
     "epsilon 50, above this node's budget"),
])
def test_a_message_asking_a_sample_level_node_for_less_is_refused_and_the_node_says_so(
        ws, tmp_path, what, overrides, match):
    overrides = dict(overrides)
    delta = overrides.pop("delta_message", DELTA)
    logged = _node_log()
    try:
        with pytest.raises(UsageError, match=match):
            _train(ws, {**POLICY, "state-dir": str(tmp_path / "node")}, delta=delta, **overrides)
    finally:
        logging.getLogger("flwr").removeHandler(logged)
    assert any("node DP policy refuses" in line and match.split(",")[0] in line
               for line in logged.lines), logged.lines
    assert _files(tmp_path / "node") == []  # nothing trained, nothing accounted


def test_a_calibrated_z_below_the_nodes_floor_is_refused(ws, tmp_path):
    """ε = 19 over 2 rounds of 3 steps at q = 1/3 calibrates to z < 0.8: the message never
    names z, the node still refuses it."""
    with pytest.raises(UsageError, match="below its floor dp-noise-multiplier=0.8"):
        _train(ws, {**POLICY, "state-dir": str(tmp_path)}, noise_multiplier=None, epsilon=19.0)
    assert not (tmp_path / "accountants").exists()


def test_a_foreign_output_path_is_not_a_path_on_the_node(ws, tmp_path):
    foreign = tmp_path / "server-chose-this"
    node = tmp_path / "node"
    metrics = _train(ws, {**POLICY, "state-dir": str(node)}, output=str(foreign))
    assert metrics["noise-multiplier"] == 1.0 and metrics["dp-steps"] == math.ceil(N_EXAMPLES / BATCH)
    assert not foreign.exists()
    assert (node / "accountants" / f"{CLIENT}.json").is_file()


def test_the_accountant_persists_across_runs_and_the_nodes_budget_holds_over_all_of_them(ws, tmp_path):
    """Three runs (different output names, each starting at round 1) on one node: the
    accountant keeps every step, and the run that would pass the node's ε budget is refused."""
    node = {**POLICY, "dp-epsilon": 10.0, "state-dir": str(tmp_path)}
    eps = [_train(ws, node, output=f"runs/run-{r}")["epsilon"] for r in range(2)]
    history = json.loads((tmp_path / "accountants" / f"{CLIENT}.json").read_text())["history"]
    assert sum(n for _, _, n in history) == 2 * math.ceil(N_EXAMPLES / BATCH)
    assert eps[1] > eps[0]  # the second run continued the first one's accountant
    with pytest.raises(UsageError, match="past this node.s budget dp-epsilon 10.0"):
        for r in range(2, 12):
            _train(ws, node, output=f"runs/run-{r}")


def test_a_deployed_node_without_state_dir_keeps_its_accountant_under_flwr_home(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    _train(ws, {"dp": "sample", "dp-noise-multiplier": 0.5}, output=str(tmp_path / "out"))
    assert (tmp_path / "flwr-home" / "fedpeft-state" / "accountants" / f"{CLIENT}.json").is_file()
    assert not (tmp_path / "out").exists()


def test_a_node_without_a_dp_policy_still_refuses_seeded_noise(ws, tmp_path):
    with pytest.raises(UsageError, match="insecure reproducible"):
        _train(ws, {"state-dir": str(tmp_path)}, insecure_reproducible_noise=True)
    allowed = {"state-dir": str(tmp_path), "insecure-reproducible-noise": True}
    assert _train(ws, allowed, insecure_reproducible_noise=True)["dp-steps"] > 0


def test_in_simulation_the_runs_config_is_the_policy(ws, tmp_path):
    """The simulator's grids mark their node configs: the run's own settings are obeyed."""
    from fedpeft.federation.node_policy import POLICY_KEY, RUN_POLICY

    metrics = _train(ws, {**POLICY, POLICY_KEY: RUN_POLICY}, noise_multiplier=0.3,
                     output=str(tmp_path / "sim"))
    assert metrics["noise-multiplier"] == 0.3
    assert (tmp_path / "sim" / "client_state" / "accountants" / f"{CLIENT}.json").is_file()


def test_simulation_grids_mark_their_nodes_as_the_runs_own():
    from fedpeft.federation.client_app import app
    from fedpeft.federation.messages import CLIENT_ID_KEY
    from fedpeft.federation.node_policy import POLICY_KEY, RUN_POLICY
    from fedpeft.federation.virtual_grid import InProcessGrid

    grid = InProcessGrid(app, num_clients=4)
    msg = Message(RecordDict({"config": ConfigRecord({CLIENT_ID_KEY: 1})}), dst_node_id=1,
                  message_type="train")
    assert grid.context_for(msg).node_config[POLICY_KEY] == RUN_POLICY


def test_a_sample_level_policy_needs_a_budget_or_a_floor():
    from fedpeft.federation.node_policy import NodePolicy

    with pytest.raises(UsageError, match="dp-epsilon .* or dp-noise-multiplier"):
        NodePolicy.of({"dp": "sample"})
    with pytest.raises(UsageError, match="dp-delta"):
        NodePolicy.of({"dp": "sample", "dp-epsilon": 1.0, "dp-delta": 2})


def test_the_supernode_role_puts_the_nodes_policy_in_its_node_config(monkeypatch):
    from flwr.common.config import parse_config_args

    from fedpeft.deploy import __main__ as entry
    from fedpeft.federation.node_policy import NodePolicy

    seen: list[list[str]] = []
    monkeypatch.setattr(entry, "_exec", seen.append)
    monkeypatch.setenv("FEDPEFT_DP_NOISE_MULTIPLIER", "0.8")
    entry.main(["supernode", "--insecure", "--partition-id", "1", "--num-partitions", "3",
                "--dp", "sample", "--dp-epsilon", "8", "--dp-delta", "1e-6", "--state-dir", "/state"])
    (argv,) = seen
    node_config = parse_config_args([argv[argv.index("--node-config") + 1]])
    policy = NodePolicy.of(node_config)
    assert policy is not None and policy.level == "sample"
    assert (policy.epsilon, policy.noise_multiplier, policy.delta) == (8.0, 0.8, 1e-6)
    assert str(policy.accountants) == "/state/accountants"
