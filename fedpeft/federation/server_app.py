"""The fedpeft ServerApp for Flower's deployment runtime (``flwr run``).

Settings come from ``[tool.flwr.app.config]`` / ``--run-config`` (same keys as the CLI,
dashed). The simulator builds its own ServerApp around the same :func:`run_federation`.
"""

from __future__ import annotations

from datetime import datetime

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import RunConfig, validate
from fedpeft.federation.server import run_federation
from fedpeft.reporting import LogReporter
from fedpeft.results import ResultsWriter

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    flat = dict(context.run_config)
    if "num-server-rounds" in flat and "rounds" not in flat:
        flat["rounds"] = flat["num-server-rounds"]
    cfg = validate(RunConfig.from_flat(flat))
    output = cfg.output or f"runs/{datetime.now():%Y%m%d-%H%M%S}"
    run_federation(grid, cfg, [LogReporter(), ResultsWriter(output)])
