"""Fast checks of the deployment pieces (no processes): TLS, node keys, the Flower App
bundle, command lines, node-config data selection, Dockerfile and compose file.

The end-to-end run with real SuperLink/SuperNode processes is ``tests/test_deployment.py``.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedpeft.config import RunConfig
from fedpeft.deploy import app, certs, keys
from fedpeft.deploy import launcher as L

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


# --- TLS ---------------------------------------------------------------------------------

def test_server_certificate_is_signed_by_the_ca_and_names_every_host(tmp_path):
    files = certs.generate(tmp_path, ["superlink.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1")}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_owner_only_and_existing_material_is_kept(tmp_path):
    files = certs.generate(tmp_path, ["h"])
    assert files.ca_key.stat().st_mode & 0o077 == 0
    assert files.server_key.stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        certs.generate(tmp_path, ["h"])


def test_certs_are_valid_for_openssl(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    files = certs.generate(tmp_path, ["127.0.0.1"])
    out = subprocess.run(["openssl", "verify", "-CAfile", str(files.ca_cert), str(files.server_cert)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


# --- SuperNode keys ----------------------------------------------------------------------

def test_node_keys_are_p384_openssh_pairs_flower_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    k = keys.generate(tmp_path, "supernode-0")
    private = load_ssh_private_key(k.private.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert k.private.stat().st_mode & 0o077 == 0
    assert try_load_public_key(k.public)  # what `flwr supernode register` does


# --- Flower App bundle -------------------------------------------------------------------

def test_app_config_lists_every_run_setting_so_run_config_can_override_it():
    from dataclasses import fields

    config = app.default_run_config()
    assert {f.name.replace("_", "-") for f in fields(RunConfig)} == set(config)
    assert all(v is not None for v in config.values())


def test_run_config_round_trips_to_the_resolved_run_config():
    from fedpeft.server_app import config_from_run_config

    flat = {**app.default_run_config(), "clients": 3, "cohort": 3, "rounds": 2}
    cfg = config_from_run_config(flat)
    assert (cfg.clients, cfg.cohort, cfg.rounds) == (3, 3, 2)
    assert cfg.output is None and cfg.epsilon is None  # "" means "not set"
    legacy = config_from_run_config({"num-server-rounds": 4, "clients": 4, "cohort": 2})
    assert legacy.rounds == 4


def test_a_run_config_naming_a_task_gets_that_tasks_defaults_as_the_cli_does():
    from fedpeft.server_app import config_from_run_config
    from fedpeft.settings import resolve

    defaults = app.default_run_config()
    for given in ({}, {"task": "causal-lm"}, {"task": "causal-lm", "clients": 8, "max-length": 96}):
        cli = resolve({k.replace("-", "_"): v for k, v in given.items()})
        assert config_from_run_config({**defaults, **given}) == cli, given
    lm = config_from_run_config({**defaults, "task": "causal-lm"})
    assert (lm.target_modules, lm.max_length, lm.clients) == ("q_proj,v_proj", 128, 20)
    assert (config_from_run_config(defaults).target_modules, RunConfig().clients) == ("query,value", 100)


def test_app_directory_builds_a_small_fab_with_only_the_app_code(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app_dir = app.write_app(tmp_path / "fedpeft-app")
    fab = build_fab_from_disk(app_dir)
    assert len(fab) < 2_000_000
    names = zipfile.ZipFile(__import__("io").BytesIO(fab)).namelist()
    assert "fedpeft/federation/client_app.py" in names
    assert "fedpeft/server_app.py" in names
    assert any(n.startswith("strategies/") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "experiments/")) for n in names)


def test_write_app_refuses_to_replace_a_directory_that_is_not_an_app(tmp_path):
    (tmp_path / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError):
        app.write_app(tmp_path)


# --- node config: partition or own dataset -----------------------------------------------

def test_node_without_dataset_path_trains_on_its_partition():
    from fedpeft.federation.client_app import node_data

    cfg = RunConfig(clients=4, cohort=2)
    assert node_data(cfg, {"partition-id": 2, "num-partitions": 4}, 2, 4) == (cfg, 2, 4)


def test_node_with_dataset_path_trains_on_all_of_its_own_data():
    from fedpeft.federation.client_app import node_data

    cfg = RunConfig(clients=4, cohort=2, partition="dirichlet")
    local, index, count = node_data(cfg, {"dataset-path": "/data/mine.csv"}, 3, 4)
    assert (local.dataset, local.partition, index, count) == ("/data/mine.csv", "iid", 0, 1)
    assert local.lr == cfg.lr and local.rank == cfg.rank


# --- command lines: secure by default ----------------------------------------------------

def test_superlink_command_has_tls_node_auth_and_no_runtime_installs(tmp_path):
    argv = L.superlink_argv(port=9093, ca_cert=tmp_path / "ca.crt",
                            server_cert=tmp_path / "s.pem", server_key=tmp_path / "s.key")
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert "--disable-runtime-dependency-installation" in argv
    assert argv[argv.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.crt")


def test_tls_is_required_unless_insecure_is_asked_for_and_then_it_warns(tmp_path, capsys):
    with pytest.raises(ValueError):
        L.superlink_argv(port=1)
    with pytest.raises(ValueError):
        L.supernode_argv(superlink="h:1", node_config={"partition-id": 0})
    with pytest.raises(ValueError):  # node auth cannot work without TLS
        L.superlink_argv(port=1, insecure=True)
    argv = L.superlink_argv(port=1, insecure=True, node_auth=False)
    assert "--insecure" in argv
    assert "TLS is OFF" in capsys.readouterr().err


def test_node_config_argument_quotes_strings():
    arg = L.node_config_arg({"partition-id": 1, "num-partitions": 3, "dataset-path": "/d/x.csv"})
    assert arg == 'partition-id=1 num-partitions=3 dataset-path="/d/x.csv"'
    from flwr.common.config import parse_config_args

    assert parse_config_args([arg]) == {"partition-id": 1, "num-partitions": 3,
                                        "dataset-path": "/d/x.csv"}


def test_connection_is_written_where_flwr_reads_it(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    L.write_connection(tmp_path / "home", "fed", "127.0.0.1:9093", ca)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    conn = read_superlink_connection("fed")
    assert conn.address == "127.0.0.1:9093" and conn.root_certificates == str(ca.resolve())
    assert not conn.insecure
    assert read_superlink_connection(None).name == "fed"  # the default


def test_processes_stop_a_tree_by_pid(tmp_path):
    import sys
    import time

    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); time.sleep(60)")
    procs = L.Processes(tmp_path, L.flwr_env(tmp_path / "home"))
    p = procs.start("parent", [sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while not L.descendants(p.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    procs.snapshot()
    assert p.tree, "child in its own session not found"
    t = time.monotonic()
    procs.stop_all(grace=5)
    assert time.monotonic() - t < 15
    assert procs.leftovers() == []


# --- Dockerfile and compose file ---------------------------------------------------------
# No Docker daemon on the build machines: we check structure with PyYAML and a small
# Dockerfile reader, and run hadolint / yamllint / docker-compose when they are installed.

def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_pins_cpu_torch_installs_fedpeft_and_runs_as_non_root():
    ins = _dockerfile_instructions()
    base = [rest for word, rest in ins if word == "FROM"]
    assert len(base) == 1 and ":" in base[0] and "latest" not in base[0]
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/whl/cpu")
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and "${TORCH_INDEX_URL}" in runs
    assert "pip install -c constraints.txt ." in runs
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [w for w, _ in ins].index("USER") > max(i for i, (w, _) in enumerate(ins) if w == "RUN")
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert entry == ['["fedpeft-entrypoint"]']
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text()


def test_compose_brings_up_a_superlink_n_supernodes_and_a_run_with_tls_volumes():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    nodes = sorted(n for n in services if n.startswith("supernode-"))
    assert len(nodes) >= 2 and {"superlink", "run", "init", "register"} <= set(services)
    assert {"ca", "superlink-tls", "ca-public", "node-pubkeys"} <= set(compose["volumes"])

    link = services["superlink"]
    assert "superlink-tls:/certs:ro" in link["volumes"]
    assert link["command"][0] == "superlink" and "--insecure" not in link["command"]
    assert "healthcheck" in link
    assert "ca:/ca" in services["init"]["volumes"]  # the one writer of TLS material

    partitions = set()
    for name in nodes:
        node = services[name]
        assert node["command"][0] == "supernode" and "--insecure" not in node["command"]
        assert "ca-public:/certs:ro" in node["volumes"] and f"{name}-key:/keys:ro" in node["volumes"]
        env = node["environment"]
        assert env["FEDPEFT_NODE_KEY"] == f"/keys/{name}"
        assert int(env["FEDPEFT_NUM_PARTITIONS"]) == len(nodes)
        partitions.add(int(env["FEDPEFT_PARTITION_ID"]))
        assert node["depends_on"]["register"]["condition"] == "service_completed_successfully"
    assert partitions == set(range(len(nodes)))
    assert services["init"]["environment"]["FEDPEFT_NUM_NODES"] == str(len(nodes))
    run_config = services["run"]["environment"]["FEDPEFT_RUN_CONFIG"]
    assert f"clients={len(nodes)}" in run_config
    for svc in services.values():
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert "FEDPEFT_INSECURE" not in svc.get("environment", {})


def _run_entrypoint(tmp_path, uid: int):
    """Run docker/entrypoint.sh with stand-ins for ``id`` (reporting ``uid``) and ``python``
    (printing the arguments it was exec'd with) first on PATH."""
    bin_dir = tmp_path / f"bin{uid}"
    bin_dir.mkdir()
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "python").write_text('#!/bin/sh\necho "python $*"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "superlink", "--insecure"], env=env,
                          capture_output=True, text=True, timeout=30, check=False)


def test_entrypoint_refuses_root_and_execs_the_role_module(tmp_path):
    root = _run_entrypoint(tmp_path, 0)
    assert root.returncode == 1 and "refusing to run as root" in root.stderr and not root.stdout
    user = _run_entrypoint(tmp_path, 1000)
    assert user.returncode == 0 and user.stdout.strip() == "python -m fedpeft.deploy superlink --insecure"


def test_compose_roles_parse_with_the_entry_module():
    from fedpeft.deploy.__main__ import main

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        with pytest.raises(SystemExit) as exc:
            main([*svc["command"], "--help"])
        assert exc.value.code == 0, name


@pytest.mark.parametrize("tool,argv", [
    ("hadolint", ["hadolint", str(DOCKER / "Dockerfile")]),
    ("yamllint", ["yamllint", "-d", "{extends: relaxed, rules: {line-length: {max: 120}}}",
                  str(DOCKER / "compose.yaml")]),
    ("docker-compose", ["docker-compose", "-f", str(DOCKER / "compose.yaml"), "config", "-q"]),
])
def test_external_linters_when_installed(tool, argv):
    if shutil.which(tool) is None and tool == "yamllint":  # a test dependency: always there
        argv = [sys.executable, "-m", "yamllint", *argv[1:]]
    elif shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (no PyPI package; yamllint always runs)")
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_supernode_role_starts_a_warm_node_unless_flowers_subprocesses_are_asked_for(monkeypatch):
    from fedpeft.deploy import __main__ as entry

    seen: list[list[str]] = []
    monkeypatch.setattr(entry, "_exec", seen.append)
    monkeypatch.delenv("FEDPEFT_CLIENTAPP", raising=False)
    role = ["supernode", "--insecure", "--superlink", "superlink:9093", "--port", "9200",
            "--partition-id", "1", "--num-partitions", "3"]
    entry.main(role)
    entry.main([*role, "--clientapp", "subprocess"])
    monkeypatch.setenv("FEDPEFT_CLIENTAPP", "subprocess")
    entry.main(role)
    warm, plain, from_env = seen
    assert warm[1:3] == ["-m", "fedpeft.deploy.node"]
    assert warm[warm.index("--runtime-api-address") + 1] == "127.0.0.1:9200"
    assert warm[warm.index("--isolation") + 1] == "process"
    for argv in (plain, from_env):
        assert Path(argv[0]).name == "flower-supernode" and "--isolation" not in argv
