"""Run the fedpeft apps in simulation: Flower's Ray backend, or in process.

``client_resources.num_cpus = cpus_per_client`` (default 1) gives one Ray actor per core of
the Ray cluster (a local one, or ``--ray-address``); each actor holds one backbone (see
``engine/workspace.py``) and serves any number of virtual clients
(``federation/virtual_grid.py``): nothing is registered per client.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from fedpeft.config import RunConfig
from fedpeft.engine.checkpoint import Checkpoint
from fedpeft.federation.server import RunOutcome, run_federation
from fedpeft.backends import BACKENDS
from fedpeft.ray_cluster import ray_address
from fedpeft.reporting import Reporter

if TYPE_CHECKING:
    from fedpeft.federation.virtual_grid import PooledGrid


def quiet_environment() -> None:
    """No telemetry, no usage stats, no dashboards: this tool must work offline."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray starts workers at nice 15 by default: on a shared host client training then yields
    # to everything else while the server waits for it (2x wall-time spread, issue #15)
    os.environ.setdefault("RAY_worker_niceness", "0")




def simulate(cfg: RunConfig, reporters: list[Reporter], verbose: bool = False,
             resume: Checkpoint | None = None) -> RunOutcome:
    """Run ``cfg`` on the backend it names (``ray`` by default), optionally from a checkpoint."""
    from fedpeft.logs import install as install_logging

    quiet_environment()
    install_logging()  # fedpeft, not an imported library's basicConfig, decides what prints
    return BACKENDS.get(cfg.backend)(cfg, reporters, verbose, resume)


@BACKENDS.register("inprocess")
def _inprocess(cfg: RunConfig, reporters: list[Reporter], verbose: bool,
               resume: Checkpoint | None) -> RunOutcome:
    """Every client in this process, one after another: no Ray, same apps and loop."""
    from fedpeft.federation.client_app import app as client_app
    from fedpeft.federation.virtual_grid import InProcessGrid

    grid = InProcessGrid(client_app, cfg.clients)
    return run_federation(grid, cfg, reporters, resume, roster=grid.roster())


@BACKENDS.register("processes")
def _processes(cfg: RunConfig, reporters: list[Reporter], verbose: bool,
               resume: Checkpoint | None) -> RunOutcome:
    """A pool of forked worker processes on this machine, one per ``cpus_per_client`` cores,
    sharing the driver's one copy of the model (``federation/process_pool.py``)."""
    from fedpeft.federation.client_app import app as client_app
    from fedpeft.federation.process_pool import ProcessPoolGrid
    from fedpeft.engine.workspace import get_workspace
    from fedpeft.threads import process_cores

    get_workspace(cfg)  # built once, here, and inherited by every worker
    workers = max(1, int(process_cores() // cfg.cpus_per_client))
    return _run_pooled(ProcessPoolGrid(client_app, cfg.clients, workers), cfg, reporters, resume)


def _run_pooled(grid: PooledGrid, cfg: RunConfig, reporters: list[Reporter],
                resume: Checkpoint | None) -> RunOutcome:
    """The round loop on a worker pool, central evaluation sharded over its workers; closes it."""
    from fedpeft.federation.central_eval import TEST, sharded_evaluator

    evaluator = ((lambda ws, split=TEST: sharded_evaluator(grid, cfg, ws, cfg.round_timeout, split))
                 if grid.num_workers > 1 else None)
    try:
        return run_federation(grid, cfg, reporters, resume, roster=grid.roster(), evaluator=evaluator)
    finally:
        grid.close()


def ray_backend_config(cfg: RunConfig, verbose: bool) -> dict:
    """Flower Ray-backend settings: one actor per ``cpus_per_client`` CPUs of the cluster."""
    address = ray_address(cfg)
    init_args: dict = {"include_dashboard": False, "log_to_driver": verbose,
                       "logging_level": logging.INFO if verbose else logging.ERROR}
    if address:
        init_args["address"] = address  # the cluster's resources size the actor pool
    else:
        from fedpeft.threads import process_cores

        init_args.update(num_cpus=process_cores(), num_gpus=0)  # a container's quota, not the host's cores
    return {"client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": 0.0}, "init_args": init_args}


@BACKENDS.register("ray")
def _ray(cfg: RunConfig, reporters: list[Reporter], verbose: bool, resume: Checkpoint | None) -> RunOutcome:
    """Flower's Ray backend (actor pool) serving virtual clients; the round loop stays here."""
    import ray

    from fedpeft.federation.client_app import app as client_app
    from fedpeft.federation.flower_internals import flower_logger
    from fedpeft.federation.virtual_grid import RayGrid, loopback_ray

    flwr_logger = flower_logger()
    level = flwr_logger.level
    if not verbose:  # Ray's per-actor chatter; restored after the run, so later messages of this
        flwr_logger.setLevel(logging.ERROR)  # process (a node's policy refusals) still print
    if not ray_address(cfg):
        loopback_ray()
    started_here = not ray.is_initialized()
    try:
        return _run_pooled(RayGrid(client_app, cfg.clients, ray_backend_config(cfg, verbose)), cfg, reporters, resume)
    finally:
        flwr_logger.setLevel(level)
        if started_here:
            ray.shutdown()
