"""Secrets are owner-only from the moment they exist (issue 24 #10): node keys, the CA and
SuperLink keys and the role copies ``python -m fedpeft.deploy init`` installs are created 0600
and renamed into place, so neither a chmod that comes later (here: one that never comes) nor an
existing file's wider mode decides who can read them."""

from __future__ import annotations

import os
import stat

import pytest

from fedpeft.deploy import certs, keys


@pytest.fixture
def no_chmod(monkeypatch):
    """Writers that relied on a chmod after writing leave the key at the umask's mode."""
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    old = os.umask(0o022)
    yield
    os.umask(old)


def _widen(path) -> None:
    """Make ``path`` world-readable (os.chmod is switched off here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_node_keys_are_created_owner_only(tmp_path, no_chmod):
    for name in ("supernode-0", "supernode-0.pub"):  # an earlier, world-readable pair
        (tmp_path / name).write_text("old")
        _widen(tmp_path / name)
    k = keys.generate(tmp_path, "supernode-0", overwrite=True)
    assert _mode(k.private) == 0o600 and k.private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY")
    assert _mode(k.public) == 0o644


def test_tls_keys_are_created_owner_only(tmp_path, no_chmod):
    files = certs.generate(tmp_path, ["superlink"])
    assert _mode(files.ca_key) == 0o600 and _mode(files.server_key) == 0o600
    assert _mode(files.ca_cert) == 0o644 and _mode(files.server_cert) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_init_installs_role_keys_owner_only_over_a_wider_file(tmp_path, no_chmod):
    from fedpeft.deploy.__main__ import _install

    src = tmp_path / "server.key"
    src.write_bytes(b"secret")
    dst = tmp_path / "role"
    dst.mkdir()
    (dst / "server.key").write_bytes(b"old")
    _widen(dst / "server.key")
    _install(src, dst, private=True)
    assert _mode(dst / "server.key") == 0o600 and (dst / "server.key").read_bytes() == b"secret"
