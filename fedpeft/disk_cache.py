"""Arrays computed once per machine and shared by every process that needs them.

``$FEDPEFT_CACHE_DIR/<kind>/<key>.npz`` (default ``~/.cache/fedpeft``), where ``key`` hashes
everything the arrays depend on. The server, Ray workers and SuperNode ClientApp workers often
start together: a lock file per key serialises them, so the first computes and the others
wait and load. Entries are written atomically (:mod:`fedpeft.atomic`), so a crash never leaves
a truncated file; an unreadable entry (damaged by hand, a full disk) is computed again.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedpeft.atomic import atomic_write_bytes


def key_of(parts: dict[str, object], length: int = 32) -> str:
    """A cache key: the SHA-256 of ``parts`` as sorted JSON (other values as ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


def cache_root() -> Path:
    return Path(os.environ.get("FEDPEFT_CACHE_DIR") or Path.home() / ".cache" / "fedpeft")


def cached_arrays(kind: str, key: str, compute: Callable[[], dict[str, np.ndarray]],
                  mmap: bool = False) -> dict[str, np.ndarray]:
    """``compute()`` once per ``(kind, key)`` on this machine; later calls load its arrays.

    ``mmap``: keep the entry as a folder of ``.npy`` files and return read-only memory maps
    (for large arrays, e.g. cached hidden states: every process that maps them, forked
    workers included, shares one copy in the page cache instead of reading its own)."""
    directory = cache_root() / kind
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.npz"
    with open(directory / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if mmap:
                return _mapped_entry(directory / key, compute)
            if path.is_file():
                try:
                    with np.load(path) as data:
                        return {k: data[k] for k in data.files}
                except (OSError, ValueError, EOFError, zipfile.BadZipFile):
                    pass  # unreadable: computed and replaced below
            arrays = compute()
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            atomic_write_bytes(path, buf.getvalue())
            return arrays
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _mapped_entry(folder: Path, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays of ``folder`` (one ``.npy`` per array, listed in ``arrays.json``) memory-mapped
    read-only; computed and written first when missing or unreadable. The folder is built
    beside its final name and renamed into place, so readers never see a partial entry."""
    index = folder / "arrays.json"
    if index.is_file():
        try:
            names = json.loads(index.read_text())
            return {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)  # unreadable: computed again below
    arrays = compute()
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        for name, value in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(value))
        (tmp / "arrays.json").write_text(json.dumps(sorted(arrays)))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in arrays}


def cached_folder(kind: str, key: str, fill: Callable[[Path], None], complete: str) -> Path:
    """``$FEDPEFT_CACHE_DIR/<kind>/<key>/``, filled once per machine by ``fill(tmp)`` (for
    files that are not arrays, e.g. a converted model folder). Same discipline as
    :func:`cached_arrays`: a lock file per key (the first process fills, the others wait and
    reuse), filled beside its final name and renamed into place, so a crash never leaves a
    partial folder; ``complete`` names the file whose presence marks a usable entry."""
    directory = cache_root() / kind
    directory.mkdir(parents=True, exist_ok=True)
    folder = directory / key
    with open(directory / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (folder / complete).is_file():
                return folder
            tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{key}.", suffix=".tmp"))
            try:
                fill(tmp)
                if not (tmp / complete).is_file():
                    raise RuntimeError(f"filling cache entry {kind}/{key} wrote no {complete}")
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
