"""Check that two behaviour snapshots (tools/behaviour_snapshot.sh) hold the same results.

Compares every run's results.json (minus wall times and the run's own output path), rounds.csv
(minus wall_s) and the tensors of its exported adapter, exactly. Exit 1 and name the first
difference of each run otherwise. Usage: python tools/same_results.py BEFORE AFTER
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from safetensors.numpy import load_file

#: keys that measure the machine or name the run's directory, not what was computed
VOLATILE = ("wall", "seconds", "elapsed", "time", "output", "started", "finished", "host", "load")


def strip(value):
    """``value`` without volatile keys, recursively."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if not any(w in k.lower() for w in VOLATILE)}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def first_difference(a, b, where: str = "") -> str | None:
    """Path and values of the first place ``a`` and ``b`` differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}.{key}: only in {'after' if key not in a else 'before'}"
            found = first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def rounds(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(f)]


def tensors(run: Path) -> dict:
    found = sorted(run.glob("model/*.safetensors"))
    return {f"{p.name}:{k}": v.tolist() for p in found for k, v in load_file(str(p)).items()}


def compare(before: Path, after: Path) -> list[str]:
    problems = []
    for run in sorted(p for p in before.iterdir() if p.is_dir()):
        other = after / run.name
        if not other.is_dir():
            problems.append(f"{run.name}: missing after")
            continue
        checks = [
            ("results.json", lambda d: strip(json.loads((d / "results.json").read_text()))),
            ("rounds.csv", lambda d: rounds(d / "rounds.csv")),
            ("model", tensors),
        ]
        for label, read in checks:
            found = first_difference(read(run), read(other))
            if found:
                problems.append(f"{run.name} {label}{found}")
    return problems


if __name__ == "__main__":
    before, after = (Path(a) for a in sys.argv[1:3])
    problems = compare(before, after)
    for line in problems:
        print(line)
    runs = sum(1 for p in before.iterdir() if p.is_dir())
    print(f"{runs} runs compared: " + ("identical" if not problems else f"{len(problems)} differ"))
    sys.exit(1 if problems else 0)
