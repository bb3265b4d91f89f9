"""The fedpeft ServerApp for Flower's deployment runtime (``flwr run``).

Settings come from ``[tool.flwr.app.config]`` / ``--run-config`` (same keys as the CLI,
dashed). The simulator builds its own ServerApp around the same :func:`run_federation`.
"""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import datetime
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import RunConfig
from fedpeft.settings import resolve, task_dependent
from fedpeft.federation.server import run_federation
from fedpeft.logs import install as install_logging
from fedpeft.reporting import LogReporter, optional_reporters
from fedpeft.results import ResultsWriter

app = ServerApp()

# Settings whose default is None (TOML has no null): "" in the run config means "not set".
_OPTIONAL = {f.name.replace("_", "-") for f in fields(RunConfig) if f.default is None}


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """Flower run config -> resolved, validated RunConfig (same resolution as the CLI)."""
    flat = dict(run_config)
    if "num-server-rounds" in flat and "rounds" not in flat:
        flat["rounds"] = flat["num-server-rounds"]
    # "" = not set: no default, or the task's default (deploy/app.py default_run_config)
    task_keys = task_dependent()
    flat = {k: v for k, v in flat.items()
            if not (v == "" and (k in _OPTIONAL or k.replace("-", "_") in task_keys))}
    given = {k.replace("-", "_") for k in flat}
    values = RunConfig.from_flat(flat).to_dict()
    return resolve({k: v for k, v in values.items() if k in given or k not in task_keys})


@app.main()
def main(grid: Grid, context: Context) -> None:
    install_logging()  # fedpeft/logs.py: no imported library's basicConfig decides what prints
    cfg = config_from_run_config(dict(context.run_config))
    # one run directory for results, checkpoints and the exported model (<output>/model)
    cfg = replace(cfg, output=cfg.output or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    run_federation(grid, cfg, [LogReporter(), ResultsWriter(cfg.output), *optional_reporters(cfg)])
