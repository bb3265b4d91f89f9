"""A pool of forked worker processes on this machine that share one copy of the model.

Why: on a small host the work is the clients' training and it parallelises best as one
single-threaded process per core (batch-8 steps of a small transformer scale poorly over
intra-op threads, and collapse when another process holds a core: issue #15). Ray gives that,
but every actor loads its own backbone, tokeniser and data (3.3 GiB process tree for 2 actors,
against 1.8 GiB for pfl-research's 2 workers) and a Ray instance costs start-up time. Here the
driver builds the workspace once (:mod:`fedpeft.engine.workspace`: backbone, token ids,
partitions) and then forks ``workers`` processes: they inherit it copy-on-write, and since
training never writes a frozen tensor, those pages stay shared. Each worker then runs the
same ClientApp as a Ray actor, one message at a time, with ``cpus_per_client`` torch threads.

Forking after torch is loaded is safe here because a worker never enters an OpenMP parallel
region with more than one thread (libgomp's thread pool does not survive ``fork``; torch runs
single-threaded ops inline): settings refuse ``--cpus-per-client`` >= 2 on this backend (a
2-thread worker hung when tried), and ``auto`` picks Ray for it. The driver forks before it
starts any dispatch thread. ``gc.freeze()`` first keeps the workers' garbage collector from touching (and so
copying) the pages of every object the driver built.

Messages and replies cross a pipe pickled (an adapter's tensors: a few hundred kB). A worker
that dies (killed, out of memory) fails its message like a crashed client and is replaced by
a fresh fork.

Workers never hold the server's privacy key (issue 24, finding 8). Every worker, the first ones
and each replacement, is forked by a *template* process that the pool forks once, when it is
built: before the run draws its secret key (a fresh run) or reads it from the checkpoint (a
resume reads ``privacy.key`` on first use, after the pool exists). A replacement forked from the
driver mid-run would instead copy the driver's memory as it is then: the key, and whatever the
rounds so far left in its heap (derived seeds, noise, replies). The template only waits for
"fork a worker" requests on a Unix socket; the new worker's end of its own socket pair travels
with the request (``SCM_RIGHTS``), so a worker is the template's child, the driver's grandchild.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import os
import queue
import select
import signal
import socket
import sys
import struct
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft.federation.virtual_grid import PooledGrid

_PID = struct.Struct("!q")


class WorkerDied(RuntimeError):
    """A worker process ended while it ran a message."""


def _serve(conn: Connection, client_app: ClientApp) -> None:
    """A worker's loop: run each (message, context) it receives, send back the reply."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if item is None:
            return
        msg, context = item
        try:
            reply = client_app(msg, context)
        except Exception as exc:  # noqa: BLE001 - a failing client is a reply with an error
            reply = PooledGrid._error_reply(msg, exc)  # noqa: SLF001
        conn.send(reply)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent ends (a worker when the template ends), so a
    driver killed mid-visit leaves no worker computing for nobody; elsewhere a no-op (the
    worker then exits when its next receive sees the driver gone)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _template(control: socket.socket, client_app: ClientApp, driver_end: socket.socket) -> None:
    """The template's loop: for each request (one file descriptor: the worker's end of its
    socket pair) fork a worker, reply with its pid. Ends when the driver closes ``control``
    (or dies): the fork copied the driver's end of the pair too, and a copy held here would
    keep the socket open and the template (and its workers) alive after the driver is gone."""
    driver_end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not fds:  # the driver closed the socket (or sent no descriptor)
            return
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                _die_with_parent()
                control.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _serve(Connection(fds[0]), client_app)
            except BaseException:  # noqa: BLE001 - never return into the template's loop
                code = 1
            finally:
                os._exit(code)
        os.close(fds[0])
        control.sendall(_PID.pack(pid))


class _Template:
    """The driver's handle on the template process."""

    def __init__(self, ctx: Any, client_app: ClientApp) -> None:
        self._control, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = ctx.Process(target=_template, args=(child, client_app, self._control), daemon=True,
                                   name="fedpeft-pool-template")
        self.process.start()
        child.close()
        self._lock = threading.Lock()

    def fork_worker(self) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                socket.send_fds(self._control, [b"w"], [theirs.fileno()])
                data = b""
                while len(data) < _PID.size:
                    chunk = self._control.recv(_PID.size - len(data))
                    if not chunk:
                        raise RuntimeError(f"the worker pool's template process {self.process.pid} ended "
                                           f"(exit code {self.process.exitcode})")
                    data += chunk
        finally:
            theirs.close()
        return _Worker(Connection(ours.detach()), _PID.unpack(data)[0])

    def close(self) -> None:
        self._control.close()  # the template's recv sees end-of-file and returns
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


class _Worker:
    """The driver's handle on one worker: its socket and its pid (a grandchild: watched
    through a pidfd, not waited for)."""

    def __init__(self, conn: Connection, pid: int) -> None:
        self.conn, self.pid = conn, pid
        self._pidfd: int | None = None
        self._ended = False
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone
            self._ended = True
        except (AttributeError, OSError):  # no pidfd (old kernel): fall back to signal 0
            pass

    def run(self, msg: Message, context: Context) -> Message:
        try:
            self.conn.send((msg, context))
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            self._wait(5)
            raise WorkerDied(f"worker process {self.pid} ended while running this message") from exc

    def _wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the worker to end; whether it has."""
        if self._ended:
            return True
        if self._pidfd is not None:
            self._ended = bool(select.select([self._pidfd], [], [], timeout)[0])
            return self._ended
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self._ended = True
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return not self._wait(0)

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        if not self._wait(5):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait(5)
        self.conn.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class ProcessPoolGrid(PooledGrid):
    """``num_workers`` forked processes serve every logical client. Build the workspace in
    this process before constructing the grid, so the workers inherit it."""

    def __init__(self, client_app: ClientApp, num_clients: int, num_workers: int) -> None:
        gc.freeze()  # the workers' GC must not write to (and so copy) the driver's objects
        # forked now, before the run has a secret; it forks every worker (module docstring)
        self._template = _Template(mp.get_context("fork"), client_app)
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._closed = False
        for _ in range(num_workers):  # before PooledGrid starts any thread
            self._add_worker()
        super().__init__(num_clients, num_workers)

    def _add_worker(self) -> None:
        worker = self._template.fork_worker()
        self._all.append(worker)
        self._idle.put(worker)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.pid for w in self._all if w.alive]

    @property
    def template_pid(self) -> int | None:
        """Process id of the template that forks the workers."""
        return self._template.process.pid

    def _execute(self, msg: Message, context: Context) -> Message:
        worker = self._idle.get()
        try:
            return worker.run(msg, context)
        finally:
            if worker.alive:
                self._idle.put(worker)
            elif not self._closed:  # replace it: the pool keeps its size
                worker.stop()
                self._all.remove(worker)
                self._add_worker()

    def close(self) -> None:
        self._closed = True
        super().close()
        for worker in list(self._all):
            worker.stop()
        self._all.clear()
        self._template.close()
        gc.unfreeze()
