"""Imports point down the layers (issue 27): every run-time import among fedpeft's modules
(found by ``tools/import_graph.py`` with ``ast``, imports inside functions included) goes from
a module to one in its own layer or a lower one.

The table is what the code does today, lowest layer first. The imports that run against it
are listed in KNOWN_VIOLATIONS: the test passes with them and fails on any new one, and on an
entry that no longer occurs (a refactor that removes one deletes its line here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from import_graph import graph  # noqa: E402

#: layers, lowest first; a module belongs to the layer of the longest name in it that is its
#: own name or a package above it (``fedpeft.data`` holds ``fedpeft.data.chat``), except that
#: ``fedpeft`` names the package's ``__init__`` only: a new top-level module needs a line here
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation: errors, files, registries, config, results", (
        "fedpeft", "fedpeft.errors", "fedpeft.atomic", "fedpeft.client_files", "fedpeft.disk_cache",
        "fedpeft.registry", "fedpeft.plugins", "fedpeft.logs", "fedpeft.options", "fedpeft.config",
        "fedpeft.results", "fedpeft.reporting", "fedpeft.updates", "fedpeft.aggregation", "fedpeft.layout",
        "fedpeft.records",
        "fedpeft.seed_statistics", "fedpeft.threads", "fedpeft.backends", "fedpeft.ray_cluster")),
    ("data and model", ("fedpeft.data", "fedpeft.model")),
    ("adapters, strategies' base, privacy and compression maths, export", (
        "fedpeft.adapters", "fedpeft.strategy", "fedpeft.server_optim", "fedpeft.iterate_average",
        "fedpeft.privacy", "fedpeft.compression", "fedpeft.export", "fedpeft.causal_lm_export")),
    ("training", ("fedpeft.training",)),
    ("tasks", ("fedpeft.tasks",)),
    ("the planner's maths (no IO)", ("fedpeft.planning.forecast",)),
    ("the stage pipeline (its registry, not the stages)", ("fedpeft.pipeline",)),
    ("engine: a round as plain Python, no Flower", ("fedpeft.engine",)),
    ("Flower layer: ClientApp, the server's round loop, grids, messages", ("fedpeft.federation",)),
    # stages are plug-ins, as strategies/ are: the round finds them by the pipeline's registry,
    # and they use what is below (training.probe, engine.client); an import of a stage
    # by name from below is a violation
    ("stages: plug-ins found by the pipeline's registry", ("fedpeft.stages",)),
    ("planning and settings", ("fedpeft.planning", "fedpeft.settings")),
    ("entry points", (
        "fedpeft.simulation", "fedpeft.server_app", "fedpeft.cli_options", "fedpeft.compare", "fedpeft.plots", "fedpeft.inference", "fedpeft.generation",
        "fedpeft.deploy", "fedpeft.cli")),
]

#: (importer, imported) pairs that run against the layers today: none. Issue 27 found six (a
#: Layout filed under federation, server_app -> settings, server -> planning, records -- Flower
#: glue -- below the codec's wire format, server -> stages.compression, privacy_plan ->
#: stages.user_dp); an exception added here needs its reason beside it.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def layer_of(module: str) -> int | None:
    """Index in LAYERS of ``module``'s layer, or None if the table does not place it."""
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            below = prefix != "fedpeft" and module.startswith(prefix + ".")
            if (module == prefix or below) and len(prefix) > best:
                best, found = len(prefix), index
    return found


def upward_imports(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Imports among fedpeft's placed modules from a layer to a higher one."""
    placed = {m for m in edges if layer_of(m) is not None}
    return {(m, d) for m in placed for d in edges[m] & placed if layer_of(d) > layer_of(m)}


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return graph()


def test_every_module_has_a_layer(edges):
    unplaced = sorted(m for m in edges if m.startswith("fedpeft") and layer_of(m) is None)
    assert not unplaced, f"add these modules to a layer in tests/test_layering.py: {unplaced}"


def test_no_import_runs_up_the_layers_except_the_known_ones(edges):
    found = upward_imports(edges)
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "imports from a lower layer to a higher one: " + ", ".join(
        f"{m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})" for m, d in new)
    gone = sorted(KNOWN_VIOLATIONS - found)
    assert not gone, f"these no longer happen: delete them from KNOWN_VIOLATIONS: {gone}"


def test_a_planted_upward_import_is_caught(edges):
    planted = {m: set(d) for m, d in edges.items()}
    planted["fedpeft.data.partition"].add("fedpeft.federation.server")  # data -> federation
    planted["fedpeft.errors"].add("fedpeft.cli")  # the lowest layer -> the highest
    assert upward_imports(planted) - upward_imports(edges) == {
        ("fedpeft.data.partition", "fedpeft.federation.server"), ("fedpeft.errors", "fedpeft.cli")}


def test_the_table_places_modules_by_their_most_specific_package():
    assert layer_of("fedpeft") == 0 and layer_of("fedpeft.errors") == 0
    assert layer_of("fedpeft.data.chat") == layer_of("fedpeft.model.causal_lm") == 1
    stage, server, pipeline = "fedpeft.stages.user_dp", "fedpeft.federation.server", "fedpeft.pipeline"
    assert layer_of(stage) > layer_of(server) > layer_of(pipeline)
    assert layer_of("fedpeft.cli") == len(LAYERS) - 1
    assert layer_of("fedpeft.errorsx") is None  # a new top-level module is placed by hand
    assert layer_of("strategies.fedavg") is None


def test_the_engine_imports_no_flower():
    """fedpeft.engine is a round as plain Python (issue 27): none of its modules imports Flower,
    not even inside a function, and importing all of them does not load Flower."""
    from import_graph import third_party

    found = third_party("fedpeft.engine")
    assert len(found) >= 8, sorted(found)  # the engine's modules were found
    assert {m for m, deps in found.items() if "flwr" in deps} == set()
    assert "torch" in found["fedpeft.engine.client"]  # the scan sees third-party imports
    code = ("import sys, importlib, pkgutil, fedpeft.engine as e\n"
            "for m in pkgutil.iter_modules(e.__path__): importlib.import_module('fedpeft.engine.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout[:500]
