"""A pool of forked worker processes on this machine that share one copy of the model.

Why: on a small host the work is the clients' training and it parallelises best as one
single-threaded process per core (batch-8 steps of a small transformer scale poorly over
intra-op threads, and collapse when another process holds a core: issue #15). Ray gives that,
but every actor loads its own backbone, tokeniser and data (3.3 GiB process tree for 2 actors,
against 1.8 GiB for pfl-research's 2 workers) and a Ray instance costs start-up time. Here the
driver builds the workspace once (:mod:`fedpeft.federation.workspace`: backbone, token ids,
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
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import queue
import signal
from multiprocessing.connection import Connection
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft.federation.virtual_grid import PooledGrid


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


class _Worker:
    def __init__(self, ctx: Any, client_app: ClientApp) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, client_app), daemon=True,
                                   name="fedpeft-worker")
        self.process.start()
        child.close()

    def run(self, msg: Message, context: Context) -> Message:
        try:
            self.conn.send((msg, context))
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            self.process.join(timeout=5)
            raise WorkerDied(f"worker process {self.process.pid} ended (exit code "
                             f"{self.process.exitcode}) while running this message") from exc

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


class ProcessPoolGrid(PooledGrid):
    """``num_workers`` forked processes serve every logical client. Build the workspace in
    this process before constructing the grid, so the workers inherit it."""

    def __init__(self, client_app: ClientApp, num_clients: int, num_workers: int) -> None:
        self._ctx = mp.get_context("fork")
        self._client_app = client_app
        gc.freeze()  # the workers' GC must not write to (and so copy) the driver's objects
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._closed = False
        for _ in range(num_workers):  # before PooledGrid starts any thread
            self._add_worker()
        super().__init__(num_clients, num_workers)

    def _add_worker(self) -> None:
        worker = _Worker(self._ctx, self._client_app)
        self._all.append(worker)
        self._idle.put(worker)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.process.pid for w in self._all if w.alive]

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
        gc.unfreeze()
