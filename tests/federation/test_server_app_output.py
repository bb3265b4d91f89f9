"""The deployment ServerApp keeps one run directory: results, checkpoints and the exported model."""

from __future__ import annotations

from flwr.app import Context, RecordDict

from fedpeft.deploy.app import default_run_config
from fedpeft.federation.client_app import app as client_app
from fedpeft.federation.local_grid import LocalGrid
from fedpeft.server_app import main


def test_server_app_without_output_writes_results_and_model_to_one_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output is runs/<timestamp> under the working directory
    run_config = {**default_run_config(), "clients": 2, "cohort": 2, "rounds": 1, "max-client-examples": 8,
                  "max-test-examples": 16, "batch-size": 8}
    main(LocalGrid(client_app, 2), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                           run_config=run_config))
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "results.json").is_file()
    assert (run / "model" / "adapter_config.json").is_file() and (run / "model" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run.name]  # no runs/default beside it
