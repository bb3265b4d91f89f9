"""docker/compose.yaml: each container mounts only its own secrets (issue 24, finding 6).

No Docker daemon here, so the compose file is read with PyYAML and the ``init`` role is run
for real with the compose file's own command and environment, every container path mapped to a
temporary directory per named volume. That gives the files each volume holds; then every other
service's mounts are checked against the secrets its role may hold: the SuperLink its TLS key,
each SuperNode its own private key, nobody else any private key, and the CA key no container
but the one-shot ``init``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (named volume, read-only) for the service's volume mounts."""
    out = {}
    for spec in service.get("volumes", []):
        if isinstance(spec, dict):
            source, target, ro = spec["source"], spec["target"], bool(spec.get("read_only"))
        else:
            source, target, *mode = spec.split(":")
            ro = mode == ["ro"]
        assert not source.startswith((".", "/", "~")), f"bind mount {spec}: only named volumes"
        out[target] = (source, ro)
    return out


def _provision(compose: dict, root: Path, monkeypatch) -> dict[str, set[str]]:
    """Run ``init`` as compose would; the relative paths of the files each volume holds.

    The container's file system is ``root/fs``: every absolute path in init's command and
    environment is mapped into it, and each mount point there is a link to its volume's
    directory ``root/<volume>`` (so nothing is ever written outside ``root``)."""
    from fedpeft.deploy.__main__ import main

    init = compose["services"]["init"]
    mounts = _mounts(init)
    fs = root / "fs"
    vol_dir = {vol: root / vol for vol, _ in mounts.values()}
    for d in vol_dir.values():
        d.mkdir(parents=True, exist_ok=True)
    for target, (vol, _) in mounts.items():
        link = fs / target.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(vol_dir[vol], target_is_directory=True)

    def host(value: str) -> str:
        return str(fs / value.lstrip("/")) if value.startswith("/") else value

    for key, value in (init.get("environment") or {}).items():
        monkeypatch.setenv(key, host(str(value)))
    # the role's default directories, should the command rely on them
    monkeypatch.setenv("FEDPEFT_CERTS_DIR", host("/certs"))
    monkeypatch.setenv("FEDPEFT_KEYS_DIR", host("/keys"))
    assert main([host(a) for a in init["command"]]) == 0
    return {vol: {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
            for vol, d in vol_dir.items()}


def _secret(name: str) -> bool:
    """A private key: TLS keys and SuperNode private keys (supernode-N, no suffix)."""
    base = Path(name).name
    return base.endswith(".key") or (base.startswith("supernode-") and "." not in base)


def test_every_container_mounts_only_its_own_secrets(tmp_path, monkeypatch):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    holds = _provision(compose, tmp_path, monkeypatch)
    all_files = set().union(*holds.values())
    nodes = sorted(n for n in services if n.startswith("supernode-"))
    assert "ca.key" in {Path(f).name for f in all_files}
    assert {n for n in nodes} <= {Path(f).name for f in all_files}  # every node has a key

    allowed = {"superlink": {"server.key"}, **{n: {n} for n in nodes}}
    seen_by: dict[str, set[str]] = {}
    for name, svc in services.items():
        if name == "init":
            continue
        visible = set()
        for target, (vol, ro) in _mounts(svc).items():
            files = holds.get(vol, set())
            if any(_secret(f) for f in files):
                assert ro, f"{name} mounts secrets of {vol} writable"
            visible |= {Path(f).name for f in files}
        seen_by[name] = visible
        secrets = {f for f in visible if _secret(f)}
        assert secrets == allowed.get(name, set()), f"{name} can read {sorted(secrets)}"

    # what each role needs is there: the CA certificate everywhere, the server certificate on
    # the SuperLink, every public key (and only public keys) where nodes are registered
    assert {"ca.crt", "server.pem", "server.key"} <= seen_by["superlink"]
    for n in nodes:
        assert "ca.crt" in seen_by[n]
    assert {f"{n}.pub" for n in nodes} <= seen_by["register"]
    assert "ca.crt" in seen_by["run"]

    # the CA key is only ever mounted by the one-shot provisioning container
    ca_volumes = {v for v, files in holds.items() if any(Path(f).name == "ca.key" for f in files)}
    for name, svc in services.items():
        mounted = {vol for vol, _ in _mounts(svc).values()}
        assert name == "init" or not (mounted & ca_volumes), f"{name} mounts the CA key"
    assert services["init"].get("restart", "no") == "no"
    dependents = [n for n, s in services.items() if "init" in (s.get("depends_on") or {})]
    assert all(services[n]["depends_on"]["init"]["condition"] == "service_completed_successfully"
               for n in dependents)


def test_init_keeps_private_keys_owner_only_in_every_volume(tmp_path, monkeypatch):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    holds = _provision(compose, tmp_path, monkeypatch)
    for vol, files in holds.items():
        for f in files:
            if _secret(f):
                assert (tmp_path / vol / f).stat().st_mode & 0o077 == 0, f"{vol}/{f}"


@pytest.mark.parametrize("again", [1, 2])
def test_init_is_idempotent(tmp_path, monkeypatch, again):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    first = _provision(compose, tmp_path, monkeypatch)
    ca = (tmp_path / "ca" / "ca.crt").read_bytes() if (tmp_path / "ca" / "ca.crt").exists() else None
    for _ in range(again):
        assert _provision(compose, tmp_path, monkeypatch) == first
    if ca is not None:
        assert (tmp_path / "ca" / "ca.crt").read_bytes() == ca  # kept, not regenerated
