"""Import every module of a plug-in package so its ``@REGISTRY.register`` decorators run.

Adding an adapter or strategy is then one new file; no central list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package_name: str, package_path: list[str], skip: tuple[str, ...] = ()) -> None:
    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_") and info.name not in skip:
            importlib.import_module(f"{package_name}.{info.name}")
