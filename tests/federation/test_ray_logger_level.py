"""A Ray-backend run quiets Flower's logger for its own duration only: later messages of the same
process (a node's DP-policy refusals, discovery refusals) must still print."""

from __future__ import annotations

import logging

import pytest

import fedpeft.federation.virtual_grid as virtual_grid
import fedpeft.simulation as simulation


def test_the_ray_backend_restores_flowers_log_level(monkeypatch, tiny_cfg):
    flwr = logging.getLogger("flwr")
    monkeypatch.setattr(flwr, "level", logging.INFO)
    seen = []

    def fake_run(grid, cfg, reporters, resume):  # noqa: ANN001
        seen.append(flwr.level)
        raise RuntimeError("stop here")

    monkeypatch.setattr(virtual_grid, "RayGrid", lambda *a, **k: None)
    monkeypatch.setattr(virtual_grid, "loopback_ray", lambda: None)
    monkeypatch.setattr(simulation, "_run_pooled", fake_run)
    with pytest.raises(RuntimeError, match="stop here"):
        simulation.BACKENDS.get("ray")(tiny_cfg, [], False, None)
    assert seen == [logging.ERROR]     # quiet while the run lasts
    assert flwr.level == logging.INFO  # and as it was afterwards
