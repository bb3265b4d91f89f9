"""Clients receive only what clients need: the server-only settings are never sent, and no
client-side module reads one (an AST scan, so a new read fails here, not silently at the
default value on a remote node)."""

from __future__ import annotations

import ast
from pathlib import Path

from fedpeft.config import SERVER_ONLY, RunConfig
from fedpeft.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1] / "fedpeft"
#: everything a ClientApp runs: its handlers, training, data, model, adapters, client-side
#: privacy, and every stage that is built on clients
CLIENT_SIDE = [
    *(ROOT / "federation" / n for n in ("client.py", "client_app.py", "client_state.py", "workspace.py",
                                         "faults.py", "local_params.py")),
    *sorted((ROOT / "training").glob("*.py")), *sorted((ROOT / "data").glob("*.py")),
    *sorted((ROOT / "model").glob("*.py")), *sorted((ROOT / "adapters").glob("*.py")),
    *sorted((ROOT / "tasks").glob("*.py")),
    ROOT / "privacy" / "client_accounting.py",
]


def _config_reads(path: Path) -> set[str]:
    """Names ``x`` of every ``cfg.x`` / ``<...>.cfg.x`` / ``config.x`` attribute read."""
    reads = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute):
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name in ("cfg", "config", "run_config"):
                reads.add(node.attr)
    return reads


def test_server_only_settings_are_real_fields():
    assert SERVER_ONLY <= set(RunConfig.__dataclass_fields__)


def test_no_client_side_module_reads_a_server_only_setting():
    client_stages = [Path(__import__(STAGES.get(n).__module__, fromlist=["x"]).__file__)
                     for n in STAGES.names() if "client" in STAGES.get(n).sides]
    assert {p.name for p in client_stages} >= {"compression.py", "client_local.py", "rank_cap.py", "dp_sgd.py"}
    offenders = {str(p.relative_to(ROOT)): sorted(_config_reads(p) & SERVER_ONLY)
                 for p in [*CLIENT_SIDE, *client_stages] if _config_reads(p) & SERVER_ONLY}
    assert offenders == {}


def test_the_scan_sees_a_read_it_should_refuse(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text("def f(task):\n    return task.cfg.server_lr + cfg.clip\n")
    assert _config_reads(planted) & SERVER_ONLY == {"server_lr", "clip"}


def test_train_messages_carry_no_server_only_setting_and_the_rest_round_trips():
    cfg = RunConfig(clients=1000, cohort=50, server_opt="fedadam", clip=0.3, compression="stc", rounds=7,
                    epsilon=2.0, dp="sample", output="runs/x")
    flat = cfg.to_client_flat()
    assert not {k.replace("-", "_") for k in flat} & SERVER_ONLY
    back = RunConfig.from_flat(flat)
    for name in RunConfig.__dataclass_fields__:
        expected = getattr(RunConfig(), name) if name in SERVER_ONLY else getattr(cfg, name)
        assert getattr(back, name) == expected, name
    assert len(flat) < len(cfg.to_flat())
