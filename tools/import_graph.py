"""Import graph of fedpeft/ and strategies/ (every run-time import, also inside functions; not
``if TYPE_CHECKING:`` blocks) and its cycles.

    python tools/import_graph.py            # prints each cycle (strongly connected component)

Exit code 1 when a cycle exists. tests/test_architecture.py runs the same check.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedpeft", "strategies")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imported_names(mod: str, path: Path) -> set[str]:
    """Every absolute name a run-time import in ``path`` (module ``mod``) names: ``a.b`` and
    ``a.b.c`` for ``from a.b import c``, relative imports resolved, TYPE_CHECKING blocks left out."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for blk in ast.walk(tree) if isinstance(blk, ast.If)
                   and getattr(blk.test, "id", getattr(blk.test, "attr", "")) == "TYPE_CHECKING"
                   for stmt in blk.body for n in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue  # annotations only: not an import at run time
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.update([base] + [f"{base}.{a.name}" for a in node.names])
    return names


def third_party(prefix: str) -> dict[str, set[str]]:
    """For each of our modules named ``prefix`` or below it, the top-level packages not ours
    that it imports at run time (``flwr``, ``torch``, ...)."""
    found = {}
    for mod, path in _files().items():
        if mod == prefix or mod.startswith(prefix + "."):
            found[mod] = {n.split(".")[0] for n in imported_names(mod, path)} - set(PACKAGES) - {""}
    return found


def graph() -> dict[str, set[str]]:
    files = _files()
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for t in imported_names(mod, path):
            # the deepest module of ours the import names (``a.b.c`` -> ``a.b`` if c is a symbol)
            while t and t not in files:
                t = t.rpartition(".")[0]
            if t and t != mod:
                edges[mod].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    found = cycles(graph())
    for comp in found:
        print(f"cycle of {len(comp)} modules: {', '.join(comp)}")
    print("no import cycle" if not found else f"{len(found)} cycle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
