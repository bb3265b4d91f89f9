"""The simulation's uses of Flower internals sit behind one version guard
(fedpeft/federation/flower_internals.py): any Flower release but the tested one is refused with
one line naming both versions, before a grid is built; the tested one, and the override for
whoever ports fedpeft to a new release, run."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest

from fedpeft.federation import flower_internals as FI

ROOT = Path(__file__).resolve().parents[2]


def test_the_tested_release_is_the_one_pinned_and_installed():
    from fedpeft.deploy.clientapp_worker import TESTED_FLOWER as WORKER_PIN

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(re.fullmatch(r"flwr\[simulation\]==(\S+)", d).group(1) for d in deps if d.startswith("flwr["))
    assert FI.TESTED_FLOWER == pinned == WORKER_PIN == FI.installed_flower()
    assert FI.flower_version_problem() is None
    FI.require_tested_flower()  # no error, no warning


def test_an_untested_release_is_refused_in_one_line_naming_both(monkeypatch):
    monkeypatch.delenv(FI.OVERRIDE_ENV, raising=False)
    with pytest.raises(FI.UntestedFlower) as err:
        FI.require_tested_flower("1.43.0")
    message = str(err.value)
    assert "\n" not in message
    assert "flwr 1.43.0" in message and f"flwr {FI.TESTED_FLOWER}" in message
    assert f"flwr[simulation]=={FI.TESTED_FLOWER}" in message  # and what to do about it


def test_a_grid_is_not_built_on_an_untested_release(monkeypatch):
    from fedpeft.federation.client_app import app
    from fedpeft.federation.virtual_grid import InProcessGrid, RayGrid

    monkeypatch.delenv(FI.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(FI, "installed_flower", lambda: "2.0.0")
    with pytest.raises(FI.UntestedFlower, match="found flwr 2.0.0"):
        InProcessGrid(app, 4)
    with pytest.raises(FI.UntestedFlower, match="found flwr 2.0.0"):
        RayGrid(app, 4, {})  # refused before Ray starts


def test_the_override_runs_an_untested_release_with_a_warning(monkeypatch):
    monkeypatch.setenv(FI.OVERRIDE_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FI.require_tested_flower("1.43.0")
    assert len(caught) == 1 and "found flwr 1.43.0" in str(caught[0].message)


def test_a_uninstalled_flower_is_named_as_such():
    assert "found flwr none" in FI.flower_version_problem("none")


def test_the_logger_is_flowers_own():
    import logging

    assert FI.flower_logger() is logging.getLogger("flwr")
