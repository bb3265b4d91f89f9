"""Atomic file replacement: write beside the target, then ``os.replace``.

A reader (or a crash) sees the old file or the new one, never a half-written one. Used for
results files, error-feedback residuals and client accountants, and for secrets
(:func:`write_private`): the temporary file is created owner-only (``mkstemp``: mode 0600), so
a key is never readable by anyone else, not even for an instant, and an existing file's wider
mode is never inherited (``os.replace`` puts a new inode in its place).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True, mode: int | None = None) -> None:
    """Replace ``path`` by ``data``; the file is created 0600 (``mkstemp``), or ``mode`` set on
    its descriptor before anything is written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_private(path: Path, data: bytes) -> None:
    """A secret (private key, privacy key): mode 0600 from its creation, replaced atomically."""
    atomic_write_bytes(Path(path), data, fsync=True, mode=0o600)


def write_public(path: Path, data: bytes) -> None:
    """A file meant to be shared (certificate, public key): mode 0644, replaced atomically."""
    atomic_write_bytes(Path(path), data, fsync=True, mode=0o644)
