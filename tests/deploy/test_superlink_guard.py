"""Attacker's view of the SuperLink (issue 24, finding 1): a participant cannot register a key,
list or start runs, or claim the ServerApp's task.

A participant holds ``ca.crt`` and can reach the SuperLink's port, like every SuperNode. The
SuperLink runs as in the deployment (TLS, SuperNode authentication) behind
:mod:`fedpeft.deploy.superlink` on 127.0.0.1. The operator is on the SuperLink machine
(loopback 127.0.0.1): its ``flwr supernode register`` works. The attacker's requests leave from
127.0.0.2 — a different TCP peer on the same host, standing in for another machine — with the
same CA certificate: every Control and Runtime API call is refused (403, logged by the
SuperLink), the Fleet API still answers it, and a SuperNode holding the attacker's key is
refused when it tries to join.

Run with ``pytest -m deployment tests/deploy/test_superlink_guard.py`` (~20 s); the guard's
rules and the compose layout are checked without processes in the default suite.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fedpeft.deploy import certs, keys
from fedpeft.deploy import launcher as L

CONNECTION = "fedpeft-guard"
ATTACKER = "127.0.0.2"


def _attacker_client(ca_cert: Path) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=ATTACKER, verify=str(ca_cert))
    return httpx.Client(transport=transport, timeout=20.0)


def _post(client: httpx.Client, address: str, path: str, message) -> httpx.Response:
    return client.post(f"https://{address}{path}", content=message.SerializeToString(),
                       headers={"content-type": "application/protobuf",
                                "accept": "application/protobuf"})


@pytest.mark.deployment
def test_a_participant_cannot_register_a_key_list_runs_or_claim_the_serverapp(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.proto.control_pb2 import (  # pylint: disable=E0611
        ListNodesRequest,
        ListRunsRequest,
        RegisterNodeRequest,
        StartRunRequest,
    )
    from flwr.proto.fleet_pb2 import ActivateNodeRequest  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

    tls = certs.generate(tmp_path / "certs", ["127.0.0.1"])
    member = keys.generate(tmp_path / "keys", "supernode-0")
    foreign = keys.generate(tmp_path / "keys", "intruder")
    flwr_home = tmp_path / "flwr-home"
    env = L.flwr_env(flwr_home)
    port = L.free_port()
    address = f"127.0.0.1:{port}"
    L.write_connection(flwr_home, CONNECTION, address, tls.ca_cert)
    procs = L.Processes(tmp_path / "logs", env)
    t0 = time.monotonic()
    try:
        # the operator (loopback) starts the SuperLink and registers its participant's key
        link = L.start_loopback_superlink(
            procs, port=port, ca_cert=tls.ca_cert, server_cert=tls.server_cert,
            server_key=tls.server_key, public_keys=[member.public], connection=CONNECTION,
            env=env, cwd=tmp_path)

        with _attacker_client(tls.ca_cert) as attacker:
            refused = {
                "register its own key": _post(attacker, address, "/v1/control/register-node",
                                              RegisterNodeRequest(public_key=try_load_public_key(foreign.public))),
                "list nodes": _post(attacker, address, "/v1/control/list-nodes", ListNodesRequest()),
                "list runs (flwr ls)": _post(attacker, address, "/v1/control/list-runs", ListRunsRequest()),
                "start a run (flwr run)": _post(attacker, address, "/v1/control/start-run", StartRunRequest()),
                "claim the ServerApp task": _post(attacker, address, "/v1/runtime/acquire-task",
                                                  AcquireTaskRequest()),
                "read the API schema": attacker.get(f"https://{address}/openapi.json"),
            }
            for what, response in refused.items():
                assert response.status_code == 403 and "operator-only" in response.text, \
                    f"{what}: {response.status_code} {response.text[:200]}"
            # the Fleet API is what participants use: it answers them (here: with its own
            # authentication failure for an unsigned request), not with the operator guard
            fleet = _post(attacker, address, "/v1/fleet/activate-node",
                          ActivateNodeRequest(public_key=try_load_public_key(foreign.public)))
            assert "operator-only" not in fleet.text and fleet.status_code != 403, fleet.text[:200]

        # a SuperNode with the foreign key cannot join: its key was never registered
        intruder = procs.start("intruder", L.supernode_argv(
            superlink=address, runtime_port=L.free_port(), ca_cert=tls.ca_cert,
            private_key=foreign.private, node_config={"partition-id": 0, "num-partitions": 1}))
        intruder.popen.wait(timeout=60)
        assert intruder.popen.returncode != 0
        assert "Failed to activate SuperNode" in intruder.log_text()

        listed = subprocess.run([L.flower_bin("flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
                                env=env, capture_output=True, text=True, timeout=60, check=True)
        assert len(L._last_json(listed.stdout).get("nodes", [])) == 1, listed.stdout  # noqa: SLF001
        text = link.log_text()
        assert f"refused POST /v1/control/register-node from {ATTACKER}" in text, text[-3000:]
        assert f"refused POST /v1/runtime/acquire-task from {ATTACKER}" in text
    except BaseException:
        procs.snapshot()
        print(procs.logs(tail=80))
        raise
    finally:
        procs.stop_all(grace=10.0)
        print(f"superlink guard test: {time.monotonic() - t0:.1f} s")
    assert procs.leftovers() == []


# --- the guard itself and the compose layout (no processes) ------------------------------

def _call(guard, path: str, client) -> int:
    import asyncio

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "client": client, "headers": []}
    asyncio.run(guard(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


@pytest.mark.parametrize("path,client,allowed", [
    ("/v1/control/register-node", ("127.0.0.1", 5000), True),
    ("/v1/control/register-node", ("::1", 5000), True),
    ("/v1/control/register-node", ("::ffff:127.0.0.1", 5000), True),
    ("/v1/control/register-node", ("127.0.0.2", 5000), False),
    ("/v1/control/register-node", ("203.0.113.7", 5000), False),
    ("/v1/control/register-node", None, False),
    ("/v1/control/register-node", ("testclient", 5000), False),
    ("/v1/runtime/acquire-task", ("10.0.0.5", 5000), False),
    ("/v1/fleet/../control/register-node", ("10.0.0.5", 5000), False),
    ("/v1/fleet/./pull-messages", ("10.0.0.5", 5000), False),
    ("/v1/fleet//pull-messages", ("10.0.0.5", 5000), False),
    ("//v1/control/register-node", ("10.0.0.5", 5000), False),
    ("/docs", ("10.0.0.5", 5000), False),
    ("/v1/fleet/pull-messages", ("10.0.0.5", 5000), True),
    ("/health", ("10.0.0.5", 5000), True),
])
def test_guard_serves_participants_the_fleet_api_only(path, client, allowed) -> None:
    from fedpeft.deploy.superlink import DEFAULT_OPERATOR_HOSTS, OperatorOnly, operator_set

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = OperatorOnly(app, operator_set(DEFAULT_OPERATOR_HOSTS))
    assert (_call(guard, path, client) == 200) is allowed


def test_guard_is_the_outermost_layer_of_flowers_superlink_app(monkeypatch) -> None:
    import flwr.superlink.main as superlink_main

    from fedpeft.deploy.superlink import OperatorOnly, install_guard, operator_set

    monkeypatch.setattr(superlink_main, "create_app", superlink_main.create_app)
    install_guard(operator_set(["127.0.0.1"]))
    app = superlink_main.create_app()
    assert app.user_middleware[0].cls is OperatorOnly


def test_superlink_commands_run_behind_the_guard_and_the_operator_roles_use_loopback() -> None:
    import yaml

    argv = L.superlink_argv(port=9093, ca_cert=Path("ca.crt"), server_cert=Path("s.pem"),
                            server_key=Path("s.key"), operator_hosts=["10.1.2.3"])
    assert argv[1:3] == ["-m", "fedpeft.deploy.superlink"]
    assert argv[argv.index("--operator-host") + 1] == "10.1.2.3"
    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["superlink"]["command"][0] == "superlink"
    for role in ("register", "run"):
        svc = services[role]
        assert svc["network_mode"] == "service:superlink", role
        assert svc["command"][svc["command"].index("--superlink") + 1].startswith("127.0.0.1:")
    for name in (n for n in services if n.startswith("supernode-")):
        assert "network_mode" not in services[name]  # participants: the compose network only
