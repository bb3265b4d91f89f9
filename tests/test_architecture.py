"""Dependencies point one way: no import cycle among fedpeft/ and strategies/, fedpeft's core
reaches strategies/ only through the registry, and the config module is a leaf."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import import_graph  # noqa: E402
from import_graph import cycles, graph  # noqa: E402


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = graph()
    edges["fedpeft.config"] = edges["fedpeft.config"] | {"fedpeft.settings"}  # config -> settings -> config
    assert any({"fedpeft.config", "fedpeft.settings"} <= set(c) for c in cycles(edges))


def test_the_graph_sees_every_kind_of_run_time_import(tmp_path, monkeypatch):
    """On a hand-written package: imports inside functions and relative ones count (a cycle
    through them deadlocks or half-initialises a module just the same), annotation-only
    imports under ``if TYPE_CHECKING:`` and other packages' imports do not."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg import b\n",
        "pkg/b.py": "def f():\n    from .sub import c\n    return c\n",
        "pkg/sub/__init__.py": "from . import c\n",
        "pkg/sub/c.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n"
                         "import pkg.a as alias\n"),
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\nimport torch\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(import_graph, "ROOT", tmp_path)
    monkeypatch.setattr(import_graph, "PACKAGES", ("pkg",))
    edges = graph()
    assert edges == {"pkg": set(), "pkg.a": {"pkg", "pkg.b"}, "pkg.b": {"pkg.sub", "pkg.sub.c"},
                     "pkg.sub": {"pkg.sub.c"}, "pkg.sub.c": {"pkg.a"}, "pkg.d": set()}
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"]]  # a cycle through f()'s import


def test_fedpeft_core_never_imports_strategies():
    core = {m: deps for m, deps in graph().items() if m.startswith("fedpeft")}
    offenders = {m: sorted(d for d in deps if d.split(".")[0] == "strategies") for m, deps in core.items()}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_config_imports_no_strategy_backend_or_flower_module():
    code = ("import sys, fedpeft.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('strategies', 'flwr', 'ray', 'torch') "
            "or m in ('fedpeft.simulation', 'fedpeft.strategy', 'fedpeft.federation.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_strategy_registry_loads_its_plugins_on_first_use():
    code = ("import sys; from fedpeft.strategy import STRATEGIES; before = 'strategies' in sys.modules; "
            "names = STRATEGIES.names(); print(before, 'strategies.fedavg' in sys.modules, 'fedavg' in names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "True", "True"]


def test_cli_help_lists_exactly_the_registered_plug_ins():
    """The help names come from the plug-in sources without importing them; they must be what
    the registries hold at run time (a new plug-in file shows up in --help by itself)."""
    from fedpeft.adapters import ADAPTERS
    from fedpeft.compression import CODECS
    from fedpeft.pipeline import STAGES
    from fedpeft.registry import declared_names
    from fedpeft.strategy import STRATEGIES
    from fedpeft.tasks import TASKS

    for package, variable, registry in (("strategies", "STRATEGIES", STRATEGIES), ("fedpeft.tasks", "TASKS", TASKS),
                                        ("fedpeft.compression", "CODECS", CODECS),
                                        ("fedpeft.adapters", "ADAPTERS", ADAPTERS),
                                        ("fedpeft.stages", "STAGES", STAGES)):
        assert declared_names(package, variable) == registry.names(), package
