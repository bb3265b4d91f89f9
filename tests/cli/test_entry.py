"""The console-script entry (``fedpeft.cli:run``) exits with main's code, after every atexit
handler and with its output flushed, but without the interpreter's slow teardown."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path


def test_console_script_is_run():
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["fedpeft"] == "fedpeft.cli:run"


def test_run_keeps_exit_code_output_and_atexit_handlers(tmp_path):
    marker = tmp_path / "atexit-ran"
    code = ("import atexit, sys, pathlib\n"
            f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
            "sys.argv = ['fedpeft', 'simulate', '--clients', '0']\n"
            "print('unflushed stdout line', end='')\n"
            "from fedpeft.cli import run\n"
            "run()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "--clients 0" in out.stderr and out.stdout == "unflushed stdout line"
    assert marker.read_text() == "yes"
