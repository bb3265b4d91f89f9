"""A tiny name -> object registry, so choices like ``--adapter`` are never if-chains.

A registry may name a plug-in package (``plugins="strategies"``): it is imported by name the
first time the registry is read, so its modules' ``@REGISTRY.register`` decorators run. That
is the only way fedpeft's core reaches a plug-in package, and what keeps its imports one-way.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from fedpeft.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a public name (as typed on the CLI) to a factory or class."""

    def __init__(self, kind: str, plugins: str | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._plugins = plugins

    def _load_plugins(self) -> None:
        if self._plugins is not None:
            package, self._plugins = self._plugins, None
            importlib.import_module(package)

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        self._load_plugins()
        try:
            return self._items[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def declared_names(package: str, registry: str) -> list[str]:
    """The names registered as ``@<registry>.register("name")`` in ``package``'s modules, read
    from their source without importing them (CLI help stays fast and never goes stale when a
    plug-in file is added; ``tests/test_architecture.py`` checks it against the registry)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    names = set()
    for directory in spec.submodule_search_locations:
        for path in sorted(Path(directory).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "register" and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == registry and node.args
                        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    names.add(node.args[0].value)
    return sorted(names)
