"""Run the fedpeft apps on Flower's simulation engine (Ray backend), sized for small hosts.

``client_resources.num_cpus = cpus_per_client`` (default 1) gives one Ray actor per core;
each actor holds one backbone (see ``federation/workspace.py``) and serves many clients.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from fedpeft.config import RunConfig
from fedpeft.federation.checkpoint import Checkpoint
from fedpeft.federation.server import RunOutcome, run_federation
from fedpeft.registry import Registry
from fedpeft.reporting import Reporter


def quiet_environment() -> None:
    """No telemetry, no usage stats, no dashboards: this tool must work offline."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


Backend = Callable[[RunConfig, list[Reporter], bool, "Checkpoint | None"], RunOutcome]
BACKENDS: Registry[Backend] = Registry("backend")


def simulate(cfg: RunConfig, reporters: list[Reporter], verbose: bool = False,
             resume: Checkpoint | None = None) -> RunOutcome:
    """Run ``cfg`` on the backend it names (``ray`` by default), optionally from a checkpoint."""
    quiet_environment()
    return BACKENDS.get(cfg.backend)(cfg, reporters, verbose, resume)


@BACKENDS.register("inprocess")
def _inprocess(cfg: RunConfig, reporters: list[Reporter], verbose: bool,
               resume: Checkpoint | None) -> RunOutcome:
    """Every client in this process, one after another: no Ray, same apps and loop."""
    from fedpeft.federation.client_app import app as client_app
    from fedpeft.federation.local_grid import LocalGrid

    return run_federation(LocalGrid(client_app, cfg.clients), cfg, reporters, resume)


@BACKENDS.register("ray")
def _ray(cfg: RunConfig, reporters: list[Reporter], verbose: bool, resume: Checkpoint | None) -> RunOutcome:
    """Flower's simulation engine on Ray: one actor per ``cpus_per_client`` CPUs."""
    from flwr.common.logger import FLOWER_LOGGER as flwr_logger
    from flwr.serverapp import Grid, ServerApp
    from flwr.app import Context
    from flwr.simulation import run_simulation

    from fedpeft.federation.client_app import app as client_app

    if not verbose:
        flwr_logger.setLevel(logging.ERROR)  # hides run_simulation's deprecation notice
    outcome: list[RunOutcome] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        outcome.append(run_federation(grid, cfg, reporters, resume))

    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                      "log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.clients,
                   backend_config=backend_config, verbose_logging=verbose)
    if not outcome:
        raise RuntimeError("the simulation ended without a result (see the log above)")
    return outcome[0]
