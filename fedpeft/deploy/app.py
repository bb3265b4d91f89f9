"""Write the Flower App directory that ``flwr run`` bundles (FAB) and ships to a SuperLink.

Why a generated directory rather than ``flwr run .`` on the repository:

* ``flwr run`` accepts ``--run-config`` keys only if they exist in the app's
  ``[tool.flwr.app.config]``; here every :class:`~fedpeft.config.RunConfig` field is listed
  with its default, generated from the dataclass so the two can never drift.
* The bundle holds only the code the apps import (``fedpeft/``, ``strategies/``), not
  benchmarks, experiments or docs, and works from an installed package (Docker images) as
  well as from a checkout.

SuperNodes run the ``fedpeft`` code in the bundle; its dependencies (torch, transformers,
peft, flwr, …) must already be installed on every machine (we run SuperLink with
``--disable-runtime-dependency-installation``: nothing is downloaded at run time).

Usage::

    python -m fedpeft.deploy.app --out build/fedpeft-app
    flwr run build/fedpeft-app <connection> --run-config "clients=3 cohort=3 rounds=2"
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from dataclasses import fields
from pathlib import Path

import tomli_w

from fedpeft import __version__
from fedpeft.config import RunConfig

PUBLISHER = "fedpeft"
APP_NAME = "fedpeft"
SERVER_APP = "fedpeft.server_app:app"
CLIENT_APP = "fedpeft.federation.client_app:app"
#: packages copied into the app bundle, found by name (strategies/ is a plug-in package)
_PACKAGES = ("fedpeft", "strategies")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "tests", "*.egg-info")


def default_run_config() -> dict[str, bool | int | float | str]:
    """``[tool.flwr.app.config]``: every RunConfig field (dashed) with its default.

    TOML has no null: a field whose default is ``None`` is listed as ``""``, which the
    ServerApp reads back as "not set" (see ``server_app.config_from_run_config``), so that
    ``--run-config 'epsilon=2.0'`` can override it. So is a field whose default depends on
    ``task`` (model, dataset, clients, ...): ``task="causal-lm"`` then gets that task's
    defaults, as ``fedpeft simulate --task causal-lm`` does.
    """
    from fedpeft.settings import task_dependent

    flat = {k: v for k, v in RunConfig().to_flat().items()
            if k.replace("-", "_") not in task_dependent()}
    for f in fields(RunConfig):
        flat.setdefault(f.name.replace("_", "-"), "")
    return dict(sorted(flat.items()))


def pyproject(version: str = __version__) -> dict:
    return {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": APP_NAME,
            "version": version,
            "description": "fedpeft ServerApp/ClientApp for Flower's deployment runtime",
            "license": "Apache-2.0",
            # Installed on every machine beforehand (see docker/ and docs/deployment.md).
            "dependencies": [],
        },
        "tool": {"flwr": {"app": {
            "publisher": PUBLISHER,
            "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
            "config": default_run_config(),
        }}},
    }


def write_app(out: str | Path, overwrite: bool = True) -> Path:
    """Create ``out/`` with ``pyproject.toml``, ``fedpeft/`` and ``strategies/``."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists")
        if not (out / "pyproject.toml").is_file():
            raise FileExistsError(f"{out} exists and is not a Flower App directory; refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for pkg in _PACKAGES:
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.origin is not None, f"package {pkg} is not importable"
        src = Path(spec.origin).parent
        shutil.copytree(src, out / src.name, ignore=_IGNORE)
    (out / "pyproject.toml").write_text(tomli_w.dumps(pyproject()), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.deploy.app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build/fedpeft-app", help="app directory to (re)create")
    args = parser.parse_args(argv)
    path = write_app(args.out)
    print(f"Flower App written to {path} (run it with: flwr run {path} <connection>)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
