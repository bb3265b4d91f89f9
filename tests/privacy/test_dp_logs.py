"""A DP run prints and writes no line naming a client (issue 24, finding 2), tried as an
attacker who reads the terminal and the run directory would: Opacus imported first (its
``basicConfig`` was what made Flower's DEBUG records print), Flower at its most verbose
(``FLWR_LOG_LEVEL=DEBUG``), tiny runs at user and sample level on the in-process and the
forked process-pool backends, and ``fedpeft compare`` on a DP grid — all in one subprocess
(one start-up), every byte of its stdout and stderr kept. A non-private run in the same
process is the positive control: its per-client lines do print, so the grep can see them."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from fedpeft.logs import install

#: a line naming one client: "client 17", "client-id: 3", "client_id=3", '"client": 3', "clients [1, 4"
CLIENT_ID = re.compile(r"\bclient(?:[-_ ]?id)?[\"']?\s*[:=]?\s*\d|\bclients?[\"']?\s*[:=]?\s*\[\s*\d", re.I)
TINY = ["--clients", "6", "--cohort", "3", "--rounds", "2", "--max-client-examples", "8",
        "--max-test-examples", "16", "--batch-size", "8", "--seed", "1"]
RUNS = {
    "user-inprocess": ["--dp", "user", "--epsilon", "5", "--backend", "inprocess"],
    "sample-inprocess": ["--dp", "sample", "--epsilon", "5", "--backend", "inprocess"],
    "user-processes": ["--dp", "user", "--epsilon", "5", "--backend", "processes"],
    "sample-processes": ["--dp", "sample", "--epsilon", "5", "--backend", "processes"],
    "control-no-dp": ["--backend", "inprocess"],
}
MARK = "=== fedpeft-test run "


def _script(tmp_path: Path, data: Path) -> str:
    exp = tmp_path / "exp.toml"
    exp.write_text(textwrap.dedent(f"""\
        name = "dp-logs"
        [base]
        dataset = "{data}"
        clients = 6
        cohort = 3
        rounds = 2
        max_client_examples = 8
        max_test_examples = 16
        batch_size = 8
        epsilon = 5.0
        backend = "processes"
        [grid]
        dp = ["user", "sample"]
        """))
    runs = {name: ["simulate", *TINY, "--dataset", str(data), *argv, "--output", str(tmp_path / name)] for name, argv in RUNS.items()}
    runs["compare"] = ["compare", str(exp), "--output", str(tmp_path / "compare")]
    return textwrap.dedent(f"""\
        import json, sys
        import opacus.utils.module_utils  # its logging.basicConfig, as in every run that uses Opacus
        from fedpeft.cli import main
        for name, argv in json.loads({json.dumps(json.dumps(runs))}).items():
            for stream in (sys.stdout, sys.stderr):
                print("{MARK}" + name, file=stream, flush=True)
            code = main(argv)
            print("exit", code, file=sys.stderr, flush=True)
        """)


def _sections(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(MARK)[1:]:
        name, _, body = part.partition("\n")
        out[name] = body
    return out


def _written(run_dir: Path) -> dict[str, str]:
    """Every text file a run leaves in its directory, except the server's and the clients'
    private state (``checkpoint/``, ``client_state/``: owner-only, never results)."""
    files = {}
    for path in run_dir.rglob("*"):
        if path.is_file() and not {"checkpoint", "client_state"} & set(path.relative_to(run_dir).parts):
            # the tokenizer files are the public base model's (its vocabulary has "client": 7396)
            if path.suffix in (".json", ".csv", ".md", ".txt", ".log", ".toml") and "tokenizer" not in path.name:
                files[str(path.relative_to(run_dir))] = path.read_text(encoding="utf-8", errors="replace")
    return files


def test_dp_runs_name_no_client_on_any_backend_or_in_compare(tmp_path, small_csv):
    env = {**__import__("os").environ, "FLWR_LOG_LEVEL": "DEBUG", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", _script(tmp_path, small_csv)], capture_output=True, text=True,
                          timeout=900, env=env, cwd=tmp_path)
    out, err = _sections(proc.stdout), _sections(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(err) == {*RUNS, "compare"}, proc.stderr[-3000:]
    for name in err:
        assert "exit 0" in err[name], (name, err[name][-2000:])
    # the positive control: with Flower at DEBUG a non-private run does print its client lines
    assert CLIENT_ID.search(err["control-no-dp"]), err["control-no-dp"][-2000:]
    leaks = {}
    for name in [*RUNS, "compare"]:
        if name == "control-no-dp":
            continue
        texts = {"stdout": out.get(name, ""), "stderr": err[name]}
        texts.update(_written(tmp_path / name))
        assert name == "compare" or "results.json" in texts
        for where, text in texts.items():
            hits = [line for line in text.splitlines() if CLIENT_ID.search(line)]
            if hits:
                leaks[f"{name}: {where}"] = hits[:3]
    assert leaks == {}
    compare_runs = [p for p in (tmp_path / "compare").rglob("results.json")]
    assert len(compare_runs) == 2
    assert not list(tmp_path.rglob("diagnostics_NOT_COVERED_BY_DP.json"))


def test_install_takes_the_root_logger_back_from_basic_config():
    """Unit view of the same: a ``basicConfig`` handler on the root (what Opacus adds) is removed,
    later ``basicConfig`` calls are no-ops, Flower's records stop propagating, and handlers of
    other kinds (a test runner's) stay."""
    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    saved_handlers, saved_propagate = list(root.handlers), flwr.propagate
    other = logging.NullHandler()
    try:
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(other)
        logging.basicConfig(force=False)  # no-op: the root has a handler
        root.removeHandler(other)
        logging.basicConfig()  # what `import opacus.utils.module_utils` does
        root.addHandler(other)
        flwr.propagate = True
        install()
        install()  # idempotent
        kinds = [type(h).__name__ for h in root.handlers]
        assert "StreamHandler" not in kinds and other in root.handlers
        assert sum(getattr(h, "fedpeft_owned", False) for h in root.handlers) == 1
        assert flwr.propagate is False
        before = list(root.handlers)
        logging.basicConfig()  # an import after install changes nothing
        assert root.handlers == before
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        flwr.propagate = saved_propagate
