"""``python -m fedpeft.deploy.superlink [flower-superlink options]``: Flower's SuperLink whose
Control and Runtime APIs only the operator can reach.

Flower 1.42 serves three APIs on one ``--host``/``--port``: the Fleet API (``/v1/fleet/``,
what SuperNodes use), the Control API (``/v1/control/``, what ``flwr`` uses: register and list
SuperNodes, start runs — which ships code to every SuperNode —, read logs) and the Runtime API
(``/v1/runtime/``, what the ServerApp uses: whoever claims its task reads every reply). Open
source Flower has no Control API authentication (its OIDC plug-in needs Flower Enterprise),
and every participant holds ``ca.crt``: anyone who could reach the port could register a
SuperNode key of their own, list runs, submit runs or claim the ServerApp's task.

So this entry point runs Flower's own ``flower-superlink`` with one addition, an ASGI guard in
front of the whole application: a request for anything but the Fleet API (and ``/health``) is
answered ``403`` — and logged — unless its TCP peer is an operator address (default: loopback,
``127.0.0.1`` and ``::1``, i.e. the SuperLink machine itself; ``--operator-host`` adds others).
The operator runs ``flwr`` on the SuperLink machine (or through an SSH tunnel to it); in
``docker/compose.yaml`` the operator's containers share the SuperLink's network namespace.
SuperNodes can only reach the Fleet API, where, with ``--enable-supernode-auth``, only keys the
operator registered can join (self-registration is disabled there).

The guard is installed by wrapping ``flwr.superlink.main.create_app``, a non-public function:
like the warm worker, this refuses to start on a Flower version it was not tested with.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

#: TCP peers that may use the Control and Runtime APIs unless ``--operator-host`` says otherwise
DEFAULT_OPERATOR_HOSTS = ("127.0.0.1", "::1")
#: paths every participant may reach (SuperNodes: the Fleet API; anyone: the health check)
PARTICIPANT_PREFIXES = ("/v1/fleet/",)
PUBLIC_PATHS = ("/health",)
REFUSED = "operator-only: the Control and Runtime APIs are served to the SuperLink operator only"
#: env switches that make Flower 1.42 open extra gRPC listeners outside the guard
_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


def _normalise(host: str) -> str:
    ip = ipaddress.ip_address(host.strip("[]"))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def operator_set(hosts: Iterable[str]) -> frozenset[str]:
    return frozenset(_normalise(h) for h in hosts)


def participant_path(path: str) -> bool:
    """A Fleet API path (or ``/health``), without dot segments or empty segments that a
    router or proxy might resolve elsewhere."""
    if path in PUBLIC_PATHS:
        return True
    return (path.startswith(PARTICIPANT_PREFIXES) and "//" not in path
            and not any(part in (".", "..") for part in path.split("/")))


class OperatorOnly:
    """ASGI middleware: only the Fleet API (and ``/health``) for everyone; the rest only for
    requests whose TCP peer is in ``operators``."""

    def __init__(self, app: Any, operators: frozenset[str]) -> None:
        self.app = app
        self.operators = operators

    def is_operator(self, client: Any) -> bool:
        if not client:
            return False
        try:
            return _normalise(str(client[0])) in self.operators
        except ValueError:
            return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if kind == "http" and (participant_path(path) or self.is_operator(scope.get("client"))):
            await self.app(scope, receive, send)
            return
        peer = scope.get("client") or ("?", 0)
        _log(logging.WARNING,
             f"refused {scope.get('method', kind)} {path} from {peer[0]}:{peer[1]} ({REFUSED})")
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": REFUSED}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _log(level: int, text: str) -> None:
    """One line in the SuperLink's log (Flower's logger, so it lands with Flower's lines)."""
    from flwr.common import log as flwr_log

    flwr_log(level, "fedpeft superlink: %s", text)


def install_guard(operators: frozenset[str]) -> None:
    """Every SuperLink application Flower creates from now on in this process gets the guard
    as its outermost middleware."""
    import flwr.superlink.main as superlink_main

    original = getattr(superlink_main.create_app, "__wrapped__", superlink_main.create_app)

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        app.add_middleware(OperatorOnly, operators=operators)
        return app

    create_app.__wrapped__ = original  # type: ignore[attr-defined]
    superlink_main.create_app = create_app


def main(argv: list[str] | None = None) -> int:
    from fedpeft.deploy.clientapp_worker import TESTED_FLOWER, installed_flower

    args = list(sys.argv[1:] if argv is None else argv)
    hosts: list[str] = []
    rest: list[str] = []
    while args:
        a = args.pop(0)
        if a == "--operator-host" and args:
            hosts.append(args.pop(0))
        elif a.startswith("--operator-host="):
            hosts.append(a.split("=", 1)[1])
        else:
            rest.append(a)
    found = installed_flower()
    if found != TESTED_FLOWER:
        print(f"fedpeft superlink: its operator-only guard was written for flwr {TESTED_FLOWER}, "
              f"found flwr {found}; refusing to start a SuperLink whose Control API could be "
              "open to participants", file=sys.stderr, flush=True)
        return 2
    switched = [name for name in _GRPC_SWITCHES if os.environ.get(name) == "1"]
    if switched:
        print(f"fedpeft superlink: {', '.join(switched)}=1 would open a gRPC listener outside "
              "the operator-only guard; unset it", file=sys.stderr, flush=True)
        return 2
    # uvicorn rewrites the peer address from X-Forwarded-For only for these proxies: never
    # anything but this machine, whatever the environment says
    os.environ["FORWARDED_ALLOW_IPS"] = "127.0.0.1"
    try:
        operators = operator_set(hosts or DEFAULT_OPERATOR_HOSTS)
    except ValueError as exc:
        print(f"fedpeft superlink: --operator-host must be an IP address ({exc})", file=sys.stderr)
        return 2
    install_guard(operators)
    _log(logging.INFO, f"Control and Runtime APIs served only to {', '.join(sorted(operators))}; "
          "SuperNodes reach the Fleet API only")
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *rest]
    flower_superlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
