"""``python -m fedpeft.deploy <role>``: one process of a real federation (the Docker entry).

Roles (each builds its command with :mod:`fedpeft.deploy.launcher`, the same builders the
deployment test uses, then ``exec``s it):

* ``init``      — TLS (CA + SuperLink certificate) and SuperNode keys, unless present.
* ``superlink`` — ``flower-superlink`` with TLS and SuperNode authentication.
* ``register``  — register every ``*.pub`` key in the keys directory with the SuperLink.
* ``supernode`` — one participant: ``flower-supernode`` with its warm ClientApp worker
  (``fedpeft.deploy.node``), or with Flower's fresh process per message (``--clientapp
  subprocess``).
* ``run``       — write the Flower App and ``flwr run`` it (``--stream``).

Security is on by default; ``--insecure`` (or ``FEDPEFT_INSECURE=1``) turns TLS and node
authentication off and prints a warning. Settings come from flags or ``FEDPEFT_*``
environment variables (see ``docker/compose.yaml``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from fedpeft.atomic import write_private, write_public
from fedpeft.deploy import app, certs, keys
from fedpeft.deploy import launcher as L


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"FEDPEFT_{name}", default)


def _insecure(args: argparse.Namespace) -> bool:
    return bool(args.insecure or _env("INSECURE") in ("1", "true", "yes"))


def _exec(argv: list[str]) -> None:
    print("+ " + " ".join(argv), flush=True)
    os.execvpe(argv[0], argv, L.flwr_env(Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))))


def _install(src: Path, dst_dir: Path, private: bool) -> None:
    """Copy ``src`` into ``dst_dir`` (a private key created owner-only from the start)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    # a new inode renamed into place: an existing file's wider mode is never kept (fedpeft/atomic.py)
    (write_private if private else write_public)(dst_dir / src.name, src.read_bytes())


def cmd_init(args: argparse.Namespace) -> int:
    """TLS material and node keys; with the split options, each role's files go to its own
    directory (one Docker volume each), so no container mounts another one's secrets."""
    tls_dir, key_dir = Path(args.certs), Path(args.keys)
    if (tls_dir / "ca.crt").exists():
        print(f"{tls_dir}/ca.crt exists: keeping the existing TLS material")
    else:
        hosts = [h for h in args.host or _env("TLS_HOSTS", "superlink").split(",") if h]
        certs.generate(tls_dir, hosts)
        print(f"TLS material written to {tls_dir} for {certs.unique_names(hosts)}")
    if args.superlink_tls:  # the SuperLink's own: CA certificate, its certificate and key
        _install(tls_dir / "ca.crt", Path(args.superlink_tls), private=False)
        _install(tls_dir / "server.pem", Path(args.superlink_tls), private=False)
        _install(tls_dir / "server.key", Path(args.superlink_tls), private=True)
    if args.public:  # what every participant and flwr user gets: the CA certificate only
        _install(tls_dir / "ca.crt", Path(args.public), private=False)
    for i in range(args.nodes if args.nodes is not None else int(_env("NUM_NODES", "3"))):
        name = f"supernode-{i}"
        # --node-keys: the private key in <node-keys>/<name>/ (that node's volume only), its
        # public key copied to --keys (what the operator registers); else both in --keys
        own = Path(args.node_keys) / name if args.node_keys else key_dir
        if not (own / name).exists():
            keys.generate(own, name)
            print(f"key {own / name} written")
        if args.node_keys:
            _install(own / f"{name}.pub", key_dir, private=False)
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    tls_dir = Path(args.certs)
    insecure = _insecure(args)
    _exec(L.superlink_argv(
        host=args.host, port=args.port, insecure=insecure, node_auth=not insecure,
        ca_cert=None if insecure else tls_dir / "ca.crt",
        server_cert=None if insecure else tls_dir / "server.pem",
        server_key=None if insecure else tls_dir / "server.key",
        database=Path(args.database) if args.database else None))
    return 0


def _connect(args: argparse.Namespace) -> dict[str, str]:
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    insecure = _insecure(args)
    L.write_connection(home, args.connection, args.superlink, insecure=insecure,
                       ca_cert=None if insecure else Path(args.certs) / "ca.crt")
    host, _, port = args.superlink.rpartition(":")
    L.wait_for_port(host, int(port), timeout=args.wait)
    return L.flwr_env(home)


def cmd_register(args: argparse.Namespace) -> int:
    env = _connect(args)
    pubs = sorted(Path(args.keys).glob("*.pub"))
    if not pubs:
        print(f"no *.pub keys in {args.keys}", file=sys.stderr)
        return 2
    for pub in pubs:
        try:
            print(f"{pub.name}: node id {L.register_node(pub, args.connection, env)}")
        except RuntimeError as exc:  # already registered (restart) is fine
            if "already" not in str(exc).lower():
                raise
            print(f"{pub.name}: already registered")
    return 0


def cmd_supernode(args: argparse.Namespace) -> int:
    insecure = _insecure(args)
    node_config: dict[str, int | str] = {
        "partition-id": args.partition_id if args.partition_id is not None else int(_env("PARTITION_ID", "0")),
        "num-partitions": args.num_partitions or int(_env("NUM_PARTITIONS", "1")),
    }
    dataset_path = args.dataset_path or _env("DATASET_PATH")
    if dataset_path:
        node_config["dataset-path"] = dataset_path
    # the node's own DP policy and state (fedpeft/federation/node_policy.py)
    for flag, key in (("dp", "dp"), ("dp_epsilon", "dp-epsilon"),
                      ("dp_noise_multiplier", "dp-noise-multiplier"), ("dp_delta", "dp-delta"),
                      ("state_dir", "state-dir")):
        value = getattr(args, flag) or _env(flag.upper())
        if value:
            node_config[key] = value if flag in ("dp", "state_dir") else float(value)
    key = args.key or _env("NODE_KEY")
    _exec(L.node_argv(
        superlink=args.superlink, node_config=node_config, runtime_port=args.port,
        insecure=insecure, ca_cert=None if insecure else Path(args.certs) / "ca.crt",
        private_key=None if insecure or not key else Path(key),
        clientapp=args.clientapp or _env("CLIENTAPP", "warm")))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    env = _connect(args)
    app_dir = app.write_app(args.app_dir)
    run_config = args.run_config or _env("RUN_CONFIG")
    argv = [L.flower_bin("flwr"), "run", str(app_dir), args.connection, "--stream"]
    if run_config:
        argv += ["--run-config", run_config]
    time.sleep(args.delay)  # let SuperNodes connect; discovery waits for `clients` anyway
    print("+ " + " ".join(argv), flush=True)
    return subprocess.run(argv, env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--certs", default=_env("CERTS_DIR", "/certs"), help="TLS directory")
        p.add_argument("--insecure", action="store_true",
                       help="NO TLS, NO node authentication (prints a warning)")

    p = sub.add_parser("init", help="generate TLS material and SuperNode keys if missing")
    common(p)
    p.add_argument("--keys", default=_env("KEYS_DIR", "/keys"))
    p.add_argument("--host", action="append", help="SuperLink hostname/IP (repeatable)")
    p.add_argument("--nodes", type=int, default=None, help="number of SuperNode keys")
    p.add_argument("--superlink-tls", default=None,
                   help="also copy ca.crt, server.pem and server.key here (the SuperLink's only)")
    p.add_argument("--public", default=None, help="also copy ca.crt (alone) here")
    p.add_argument("--node-keys", default=None,
                   help="write each node's private key to <dir>/<name>/ and only the public "
                        "keys to --keys")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("superlink", help="start flower-superlink")
    common(p)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9093)
    p.add_argument("--database", default=_env("DATABASE"), help="SQLite state file")
    p.set_defaults(fn=cmd_superlink)

    for name, fn, text in (("register", cmd_register, "register SuperNode public keys"),
                           ("run", cmd_run, "write the Flower App and flwr run it")):
        p = sub.add_parser(name, help=text)
        common(p)
        p.add_argument("--superlink", default=_env("SUPERLINK", "superlink:9093"))
        p.add_argument("--connection", default=_env("CONNECTION", "fedpeft"))
        p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the SuperLink")
        if name == "register":
            p.add_argument("--keys", default=_env("KEYS_DIR", "/keys"))
        else:
            p.add_argument("--app-dir", default=_env("APP_DIR", "/tmp/fedpeft-app"))
            p.add_argument("--run-config", default=None, help="e.g. 'clients=3 cohort=3 rounds=2'")
            p.add_argument("--delay", type=float, default=float(_env("RUN_DELAY", "5")))
        p.set_defaults(fn=fn)

    p = sub.add_parser("supernode", help="start flower-supernode")
    common(p)
    p.add_argument("--superlink", default=_env("SUPERLINK", "superlink:9093"))
    p.add_argument("--port", type=int, default=9094, help="local Runtime API port")
    p.add_argument("--partition-id", type=int, default=None)
    p.add_argument("--num-partitions", type=int, default=None)
    p.add_argument("--dataset-path", default=None, help="this node's own dataset")
    p.add_argument("--key", default=None, help="SuperNode private key file")
    p.add_argument("--dp", choices=("none", "sample"), default=None,
                   help="this node's DP level: sample = it trains only with sample-level DP-SGD")
    p.add_argument("--dp-epsilon", default=None, help="this node's ε budget over all runs")
    p.add_argument("--dp-noise-multiplier", default=None, help="smallest z this node trains with")
    p.add_argument("--dp-delta", default=None, help="largest δ this node accepts")
    p.add_argument("--state-dir", default=None,
                   help="where the node keeps its accountant and client state "
                        "(default $FLWR_HOME/fedpeft-state)")
    p.add_argument("--clientapp", choices=L.CLIENTAPP_MODES, default=None,
                   help="warm (default): one long-lived ClientApp process for all messages; "
                        "subprocess: Flower's fresh process per message")
    p.set_defaults(fn=cmd_supernode)

    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
