"""Clients receive only what their components declare: a message carries exactly the settings
the run's client-side components declare (fedpeft.engine.client_settings), no client-side module
reads a setting that no component declares or a server-only one (an AST scan, so a new read fails
here), and on a client reading an undeclared setting raises instead of giving a default."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from fedpeft.adapters import ADAPTERS
from fedpeft.compression import CODECS
from fedpeft.config import PRIVATE_KEY, STAGES_KEY, UNSET_KEY, ClientConfig, RunConfig, UndeclaredSetting
from fedpeft.engine.client import ROUND_SETTINGS, TRAINING_MODES
from fedpeft.engine.client_settings import CLIENT_APP_SETTINGS, declare
from fedpeft.engine.workspace import workspace_settings
from fedpeft.pipeline import STAGES
from fedpeft.settings import resolve
from fedpeft.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1] / "fedpeft"
FIELDS = set(RunConfig.__dataclass_fields__)
#: everything a ClientApp runs: its handlers, the local round, training, data, model, adapters,
#: tasks, client-side privacy, and every stage that is built on clients
CLIENT_SIDE = [
    *(ROOT / "federation" / n for n in ("client_app.py", "node_policy.py", "message_timing.py")),
    *(ROOT / "engine" / n for n in ("client.py", "client_settings.py", "client_state.py", "workspace.py",
                                     "faults.py")),
    *sorted((ROOT / "training").glob("*.py")), *sorted((ROOT / "data").glob("*.py")),
    *sorted((ROOT / "model").glob("*.py")), *sorted((ROOT / "adapters").glob("*.py")),
    *sorted((ROOT / "tasks").glob("*.py")),
    ROOT / "privacy" / "client_accounting.py",
]
#: methods of client-side modules that run on the server (settings validation, choosing the
#: stages a client is told to build, export): their reads are not sent
SERVER_SIDE_METHODS = {"active", "refusal", "complete", "build_export"}
#: settings only the server reads (aggregation, server optimiser, user-level DP, round control,
#: reporting): no client component may declare one
SERVER_ONLY = {
    "clients", "cohort", "fair_solver", "fair_lambda", "server_opt", "server_lr", "server_momentum",
    "server_beta2", "server_tau", "ema", "eval_every", "clip", "adaptive_clip", "target_quantile", "clip_lr",
    "diagnostics", "compress_down", "deadline", "max_upload_bytes", "checkpoint_every",
    "round_timeout", "backend", "ray_address", "planned", "tensorboard",
}


def _config_reads(path: Path) -> set[str]:
    """Names ``x`` of every ``cfg.x`` / ``<...>.cfg.x`` / ``config.x`` attribute read, outside
    the methods that run on the server."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    server_side = {id(n) for f in ast.walk(tree)
                   if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name in SERVER_SIDE_METHODS
                   for n in ast.walk(f)}
    reads = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in server_side:
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name in ("cfg", "config", "run_config"):
                reads.add(node.attr)
    return reads & FIELDS


def _client_stages() -> list[type]:
    return [STAGES.get(n) for n in STAGES.names() if "client" in STAGES.get(n).sides]


def _declarable() -> set[str]:
    """Every setting some client-side component may declare, over every task, adapter, codec,
    training mode and client stage."""
    found = {*ROUND_SETTINGS, *CLIENT_APP_SETTINGS}
    for task in TASKS.names():
        for adapter in ADAPTERS.names():
            found |= set(workspace_settings(RunConfig(task=task, adapter=adapter)))
    for name in TRAINING_MODES.names():
        found |= set(TRAINING_MODES.get(name).settings)
    for stage in _client_stages():
        for codec in CODECS.names():
            found |= set(stage.client_settings(RunConfig(compression=codec, client_ranks="2,4")))
    return found


def test_every_declared_setting_is_a_real_one_and_none_is_server_only():
    declarable = _declarable()
    assert declarable <= FIELDS, sorted(declarable - FIELDS)
    assert SERVER_ONLY <= FIELDS
    assert not declarable & SERVER_ONLY, sorted(declarable & SERVER_ONLY)


def test_client_side_modules_read_only_declarable_settings_and_no_server_only_one():
    client_stages = [Path(__import__(s.__module__, fromlist=["x"]).__file__) for s in _client_stages()]
    assert {p.name for p in client_stages} >= {"compression.py", "client_local.py", "rank_cap.py", "dp_sgd.py"}
    declarable = _declarable()
    reads = {str(p.relative_to(ROOT)): _config_reads(p) for p in [*CLIENT_SIDE, *client_stages]}
    assert reads["engine/client.py"] and reads["stages/dp_sgd.py"]  # the scan sees the reads
    assert {m: sorted(r & SERVER_ONLY) for m, r in reads.items() if r & SERVER_ONLY} == {}
    assert {m: sorted(r - declarable) for m, r in reads.items() if r - declarable} == {}


def test_the_scan_sees_a_read_it_should_refuse_but_not_a_server_side_method(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text("def f(task):\n    return task.cfg.server_lr + cfg.clip\n\n"
                       "class S:\n    def refusal(cls, cfg):\n        return cfg.cohort\n")
    assert _config_reads(planted) & SERVER_ONLY == {"server_lr", "clip"}


def _sent(flat: dict) -> set[str]:
    """The settings a message carries, with a value or as declared-but-None."""
    names = {k.replace("-", "_") for k in flat} & FIELDS
    return names | set(filter(None, str(flat[UNSET_KEY]).split(",")))


def test_a_plain_runs_message_carries_exactly_the_declared_settings_and_no_dp_one():
    cfg = resolve({"clients": 1000, "cohort": 50, "server_opt": "fedadam", "clip": 0.3, "rounds": 7})
    flat = cfg.to_client_flat()
    declared = declare(cfg)
    assert _sent(flat) == declared.settings
    assert set(flat) - {STAGES_KEY, UNSET_KEY, PRIVATE_KEY} == {
        k.replace("_", "-") for k in declared.settings if getattr(cfg, k) is not None}
    for absent in ("dp", "epsilon", "delta", "noise-multiplier", "sample-clip", "accountant", "rounds",
                   "clip", "cohort", "server-opt", "compression", "client-ranks", "density"):
        assert absent not in flat and absent.replace("-", "_") not in _sent(flat), absent
    assert flat[STAGES_KEY] == "" and flat[PRIVATE_KEY] is False
    assert {"lr", "batch-size", "rank", "model", "dataset", "partition", "seed"} <= set(flat)


def test_a_sample_dp_runs_message_carries_what_dp_sgd_reads():
    cfg = resolve({"dp": "sample", "epsilon": 2.0, "sample_clip": 0.7, "rounds": 7, "clip": 0.3})
    flat = cfg.to_client_flat()
    assert _sent(flat) == declare(cfg).settings
    assert flat["sample-clip"] == 0.7 and flat["epsilon"] == 2.0 and flat["rounds"] == 7
    assert {"delta", "noise_multiplier"} <= set(flat[UNSET_KEY].split(","))  # declared, None
    assert flat[STAGES_KEY] == "dp-sgd" and flat[PRIVATE_KEY] is True
    assert "clip" not in flat and "dp" not in flat  # the stage is named; dp only switches it on
    # probe/precision are the plain mode's: DP-SGD trains without them
    assert "probe-rounds" not in flat and "precision" not in flat


def test_a_user_dp_runs_message_has_no_dp_setting_but_says_the_run_is_private():
    flat = resolve({"dp": "user", "epsilon": 2.0}).to_client_flat()
    assert not {"dp", "epsilon", "clip", "sample-clip"} & set(flat)
    assert flat[PRIVATE_KEY] is True and flat[STAGES_KEY] == ""


def test_each_active_client_stage_adds_its_settings_and_is_named():
    flat = resolve({"compression": "compeft", "density": 0.1, "strategy": "flora",
                    "client_ranks": "2,4,8"}).to_client_flat()
    assert flat["compression"] == "compeft" and flat["density"] == 0.1 and "gamma" in flat
    assert flat["client-ranks"] == "2,4,8"
    assert set(flat[STAGES_KEY].split(",")) == {"compression", "rank-cap"}
    causal = resolve({"task": "causal-lm"}).to_client_flat()
    assert "text-column" not in causal and "pooling" not in causal  # the classifier's settings


def test_a_client_reads_the_declared_settings_back_and_an_undeclared_read_fails_loudly():
    cfg = resolve({"dp": "sample", "epsilon": 2.0, "clip": 0.3, "strategy": "fedsa-lora"})
    got = ClientConfig.from_flat({**cfg.to_client_flat(), "server-round": 3, "dp-delta": 1e-5})
    for name in declare(cfg).settings:
        assert getattr(got, name) == getattr(cfg, name), name
    assert got.client_stages == ("client-local", "dp-sgd") and got.private
    for undeclared in ("clip", "cohort", "probe_rounds", "dp"):
        with pytest.raises(UndeclaredSetting, match=undeclared):
            getattr(got, undeclared)
        with pytest.raises(UndeclaredSetting):
            getattr(got, undeclared, "a default")  # not an AttributeError a default would hide
    with pytest.raises(UndeclaredSetting):
        dataclasses.replace(got, lr=0.1)  # reads every setting
    changed = got.with_changes(accountant="prv", dataset="local.csv")
    assert (changed.accountant, changed.dataset, changed.lr) == ("prv", "local.csv", cfg.lr)
    with pytest.raises(UndeclaredSetting):
        changed.clip
    assert hash(got) == hash(ClientConfig.from_flat(cfg.to_client_flat())) and got != changed
    with pytest.raises(ValueError, match="not a client message"):
        ClientConfig.from_flat(cfg.to_flat())
