"""Start and stop a Flower deployment (SuperLink, SuperNodes, ``flwr``) as OS processes.

Used by ``tests/test_deployment.py`` and by anyone who wants the exact command lines: the
``*_argv`` functions return the same commands ``docs/deployment.md`` and ``docker/`` use.

Secure by default: TLS and SuperNode authentication are on unless ``insecure=True`` is
passed explicitly, which logs a warning (Flower itself refuses node authentication without
TLS).

Every process starts in its own session (process group) with its output in a log file;
:meth:`Processes.stop` ends it and every descendant — including the ``flower-superexec`` /
``flwr-serverapp`` / ``flwr-clientapp`` children Flower detaches into their own sessions —
by PID, with SIGTERM, then SIGKILL after a bounded grace period.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import tomli_w

from fedpeft.federation.message_timing import ENV_VAR as MESSAGE_TIMING_ENV

log = logging.getLogger(__name__)

INSECURE_WARNING = ("--insecure: TLS is OFF. Model updates and node credentials travel in "
                    "clear text and SuperNode authentication is impossible. Use only on a "
                    "trusted, isolated network.")


def flower_bin(name: str) -> str:
    """Path of a Flower console script: next to this interpreter first, then on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; "
                                "install flwr (pip install 'flwr[simulation]==1.42.0')")
    return found


def _warn_insecure() -> None:
    log.warning(INSECURE_WARNING)
    print(f"WARNING: {INSECURE_WARNING}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------

def superlink_argv(*, host: str = "0.0.0.0", port: int = 9093, ca_cert: Path | None = None,
                   server_cert: Path | None = None, server_key: Path | None = None,
                   node_auth: bool = True, database: Path | None = None,
                   insecure: bool = False, operator_hosts: Sequence[str] = ()) -> list[str]:
    """``flower-superlink`` behind fedpeft's operator-only guard
    (:mod:`fedpeft.deploy.superlink`): one port for the Fleet API (SuperNodes) and the Control
    and Runtime APIs, which answer only the operator (loopback, plus ``operator_hosts``).

    ``--disable-runtime-dependency-installation``: the app's dependencies are installed on
    the machine beforehand; nothing is fetched at run time (works offline).
    """
    argv = [sys.executable, "-m", "fedpeft.deploy.superlink"]
    for operator in operator_hosts:
        argv += ["--operator-host", operator]
    argv += ["--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if insecure:
        _warn_insecure()
        if node_auth:
            raise ValueError("SuperNode authentication needs TLS; drop insecure or node_auth")
        argv.append("--insecure")
    else:
        if not (ca_cert and server_cert and server_key):
            raise ValueError("TLS needs ca_cert, server_cert and server_key "
                             "(python -m fedpeft.deploy.certs), or insecure=True")
        argv += ["--ssl-ca-certfile", str(ca_cert), "--ssl-certfile", str(server_cert),
                 "--ssl-keyfile", str(server_key)]
    if node_auth:
        argv.append("--enable-supernode-auth")
    if database is not None:
        argv += ["--database", str(database)]
    return argv


def node_config_arg(node_config: Mapping[str, int | float | str | bool]) -> str:
    """``--node-config`` value: space-separated TOML ``key=value`` pairs (strings quoted)."""
    parts = []
    for key, value in node_config.items():
        if isinstance(value, str):
            if '"' in value:
                raise ValueError(f"node config value for {key!r} must not contain '\"'")
            parts.append(f'{key}="{value}"')
        elif isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


#: how a node runs its ClientApp messages: ``warm`` — one long-lived process for all of them
#: (:mod:`fedpeft.deploy.clientapp_worker`, behind ``flower-supernode --isolation process``);
#: ``subprocess`` — Flower's default, a fresh ``flwr-clientapp`` process per message
CLIENTAPP_MODES = ("warm", "subprocess")


def supernode_argv(*, superlink: str, node_config: Mapping[str, int | float | str | bool],
                   runtime_port: int = 9094, ca_cert: Path | None = None,
                   private_key: Path | None = None, insecure: bool = False,
                   max_wait_time: float | None = None, isolation: str = "subprocess") -> list[str]:
    """``flower-supernode`` for one participant.

    ``runtime_port`` is the node's local Runtime API (ClientApp processes talk to it); give
    each SuperNode on the same host its own. ``isolation="process"``: the SuperNode starts no
    executor of its own; something else (:func:`node_argv`'s warm worker) runs its tasks.
    """
    if isolation not in ("subprocess", "process"):
        raise ValueError(f"isolation must be 'subprocess' or 'process', not {isolation!r}")
    argv = [flower_bin("flower-supernode"), "--superlink", superlink,
            "--port", str(runtime_port), "--node-config", node_config_arg(node_config)]
    if isolation == "process":
        argv += ["--isolation", "process"]
    if insecure:
        _warn_insecure()
        if private_key is not None:
            raise ValueError("SuperNode authentication needs TLS; drop insecure or private_key")
        argv.append("--insecure")
    else:
        if ca_cert is None:
            raise ValueError("TLS needs the federation CA certificate (ca_cert), or insecure=True")
        argv += ["--root-certificates", str(ca_cert)]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def node_argv(*, superlink: str, node_config: Mapping[str, int | float | str | bool],
              runtime_port: int = 9094, ca_cert: Path | None = None,
              private_key: Path | None = None, insecure: bool = False,
              max_wait_time: float | None = None, clientapp: str = "warm") -> list[str]:
    """One participant, ready to train: its SuperNode and how it runs ClientApp messages.

    ``clientapp="warm"`` (default): ``python -m fedpeft.deploy.node`` starts
    ``flower-supernode --isolation process`` and the warm ClientApp worker as one process
    tree (stopping or killing it takes both). ``"subprocess"``: the plain
    :func:`supernode_argv` (Flower's fresh process per message; slower by the start-up).
    """
    if clientapp not in CLIENTAPP_MODES:
        raise ValueError(f"clientapp must be one of {CLIENTAPP_MODES}, not {clientapp!r}")
    supernode = supernode_argv(superlink=superlink, node_config=node_config,
                               runtime_port=runtime_port, ca_cert=ca_cert,
                               private_key=private_key, insecure=insecure,
                               max_wait_time=max_wait_time,
                               isolation="process" if clientapp == "warm" else "subprocess")
    if clientapp == "subprocess":
        return supernode
    return [sys.executable, "-m", "fedpeft.deploy.node",
            "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--", *supernode]


def write_connection(flwr_home: Path, name: str, address: str, ca_cert: Path | None = None,
                     insecure: bool = False, default: bool = True) -> Path:
    """Add a SuperLink connection to ``$FLWR_HOME/config.toml`` (what ``flwr run`` reads).

    Flower 1.42 keeps connections here; a ``[tool.flwr.federations]`` table in an app's
    ``pyproject.toml`` is legacy and gets migrated (and commented out) by ``flwr``.
    """
    import tomllib

    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    links = data.setdefault("superlink", {})
    conn: dict[str, str | bool] = {"address": address}
    if insecure:
        _warn_insecure()
        conn["insecure"] = True
    else:
        if ca_cert is None:
            raise ValueError("TLS needs the federation CA certificate (ca_cert), or insecure=True")
        conn["root-certificates"] = str(Path(ca_cert).resolve())
    links[name] = conn
    if default:
        links["default"] = name
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def flwr_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no telemetry, offline HF, and one
    timing line per ClientApp message in the node logs (federation/message_timing.py)."""
    env = dict(os.environ if base is None else base)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.setdefault(MESSAGE_TIMING_ENV, "1")
    # Flower spawns flower-superexec / flwr-serverapp / flwr-clientapp by name.
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def register_node(public_key: Path, connection: str, env: Mapping[str, str],
                  timeout: float = 60.0) -> int:
    """``flwr supernode register``: allow the SuperNode holding this key; returns its node id."""
    out = subprocess.run([flower_bin("flwr"), "supernode", "register", str(public_key), connection,
                          "--format", "json"], env=dict(env), capture_output=True, text=True,
                         timeout=timeout, check=False)
    payload = _last_json(out.stdout)
    if out.returncode != 0 or not payload.get("success"):
        raise RuntimeError(f"flwr supernode register failed ({out.returncode}): "
                           f"{out.stdout.strip()} {out.stderr.strip()}")
    return int(payload["node-id"])


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    start = text.find("{")
    if start >= 0:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            pass
    return {}


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until something accepts TCP connections on host:port (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before "
                               f"listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def _children_map() -> dict[int, list[int]]:
    """ppid -> [pid] from /proc (Linux); empty elsewhere."""
    out: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ... ; comm may contain spaces/parens: split after last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first found, breadth-first)."""
    children = _children_map()
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            if child not in found:
                found.append(child)
                queue.append(child)
    return found


def _start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (None if gone): tells a PID apart from its reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None = None) -> bool:
    """``pid`` runs, is not a zombie and (if ``start`` is given) is the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return not Path("/proc").is_dir()
    return fields_[0] != "Z" and (start is None or fields_[19] == start)


def _signal(pid: int, sig: int, start: str | None = None) -> None:
    if start is not None and not _alive(pid, start):
        return  # gone, or the PID now belongs to someone else
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    argv: list[str]
    _log: IO[bytes] | None = field(default=None, repr=False)
    tree: dict[int, str | None] = field(default_factory=dict)  # descendant pid -> start time

    @property
    def pid(self) -> int:
        return self.popen.pid

    def remember_tree(self) -> None:
        """Record current descendants, so they are stopped even if re-parented later."""
        for root in [self.pid, *self.tree]:
            for child in descendants(root):
                if child not in self.tree:
                    self.tree[child] = _start_time(child)

    def alive_pids(self) -> list[int]:
        own = [self.pid] if self.popen.poll() is None else []
        return own + [p for p, start in self.tree.items() if _alive(p, start)]

    def signal_all(self, sig: int) -> None:
        if self.popen.poll() is None:
            _signal(self.pid, sig)
        for pid, start in self.tree.items():
            _signal(pid, sig, start)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


class Processes:
    """The processes of one local federation; a context manager that always stops them."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env)
        self.procs: dict[str, Proc] = {}

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> Proc:
        if name in self.procs:
            raise ValueError(f"a process named {name!r} was already started")
        log_path = self.log_dir / f"{name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        popen = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=self.env, cwd=cwd,
                                 start_new_session=True)
        proc = Proc(name, popen, log_path, list(argv), fh)
        self.procs[name] = proc
        return proc

    def snapshot(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.remember_tree()

    def kill(self, name: str) -> None:
        """Crash one process and its whole tree at once (SIGKILL): a machine going away."""
        proc = self.procs[name]
        proc.remember_tree()
        proc.signal_all(signal.SIGKILL)
        proc.popen.wait(timeout=10)

    def stop(self, name: str, grace: float = 10.0) -> None:
        """SIGTERM the process and its descendants, SIGKILL whatever is left after ``grace``."""
        proc = self.procs[name]
        proc.remember_tree()
        proc.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.remember_tree()  # children started during shutdown
            if not proc.alive_pids():
                break
            time.sleep(0.1)
        proc.remember_tree()
        proc.signal_all(signal.SIGKILL)
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("process %s (pid %d) did not exit after SIGKILL", name, proc.pid)
        if proc._log is not None:
            proc._log.close()
            proc._log = None

    def stop_all(self, grace: float = 10.0) -> None:
        self.snapshot()
        for name in reversed(list(self.procs)):  # nodes before the link
            self.stop(name, grace)

    def leftovers(self) -> list[int]:
        """PIDs of anything this object started that is still alive (should be empty)."""
        return [p for proc in self.procs.values() for p in proc.alive_pids()]

    def logs(self, tail: int = 200) -> str:
        parts = []
        for proc in self.procs.values():
            lines = proc.log_text().splitlines()[-tail:]
            parts.append(f"===== {proc.name} (pid {proc.pid}) {proc.log_path} =====\n"
                         + "\n".join(lines))
        return "\n".join(parts)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def start_loopback_superlink(procs: Processes, *, port: int, ca_cert: Path, server_cert: Path,
                             server_key: Path, public_keys: Sequence[Path], connection: str,
                             env: Mapping[str, str], cwd: Path) -> Proc:
    """A SuperLink on 127.0.0.1 with TLS and node authentication, listening, with the
    SuperNodes holding ``public_keys`` registered (the local multi-process layout of the
    deployment test and benchmark)."""
    link = procs.start("superlink", superlink_argv(
        host="127.0.0.1", port=port, ca_cert=ca_cert, server_cert=server_cert,
        server_key=server_key, node_auth=True), cwd=cwd)
    wait_for_port("127.0.0.1", port, timeout=60, proc=link.popen)
    for key in public_keys:
        register_node(key, connection, env)
    return link
