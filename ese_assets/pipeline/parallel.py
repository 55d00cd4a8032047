"""An ordered process pool: worker processes compute, the calling process consumes in order.

:func:`ese_assets.pipeline.measurement.measure_images` measures a run's images with it: each worker
reads an image and measures it (no database), the run's own process writes each image's rows in
its one transaction, in the order of the paths. So the database sees exactly the writers it sees
with one process (one per run), SQLite's single-writer lock is never contended by the workers, and
the per-image error boundary, :class:`DatabaseUnavailable` and the recovery of unfinished images
work as in the serial path.

Processes, not threads: the photometry is numpy code that holds the GIL between array operations
and the FITS read is partly Python. Workers are started from a ``forkserver``: the caller (a
Dagster run, with its threads and database connections) is never forked, and the server, started
once per process with the photometry modules preloaded, forks each worker in milliseconds.

Nothing is left behind: the pool is shut down when the ``with`` block ends (also on an error, with
the work not started yet cancelled), and a worker whose parent was killed (SIGKILL, out of memory)
exits by itself within :data:`PARENT_POLL_S`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import multiprocessing.spawn
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

#: Start method of the workers (see the module docstring).
START_METHOD = "forkserver"
#: Modules the fork server imports once, so that workers start with them loaded (this module
#: first: see :func:`_adopt_caller_main`).
PRELOAD = ("ese_assets.pipeline.parallel", "ese_assets.pipeline.measurement")
#: The caller's main script, passed to the fork server through its environment.
CALLER_MAIN_ENV = "ESE_PARALLEL_CALLER_MAIN"
#: Work items submitted ahead per worker: workers never wait for the consumer, and an aborted run
#: (a database outage) throws away at most this many computed items per worker.
AHEAD_PER_WORKER = 2
#: A worker checks this often (seconds) that the process that started it is still alive.
PARENT_POLL_S = 1.0


def _caller_main_path() -> str | None:
    """The main script multiprocessing would re-run in each worker (None for ``-m``/``-c``)."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main.__spec__, "name", None) is not None:
        return None
    path = getattr(main, "__file__", None)
    return os.path.normpath(os.path.join(mp.process.ORIGINAL_DIR or "", path)) if path else None


def _adopt_caller_main() -> None:
    """Run when the fork server imports this module: let workers skip the caller's main script.

    A child of a fork server runs the caller's main script again (``runpy``) unless the server's
    ``__main__`` already has that file, and CPython 3.11's server never imports it (its
    ``'__main__'`` preload is not passed the path). For a Dagster run (``dagster``) or ``ese
    ingest`` (``ese``) that script imports the whole command line, ~2 s per worker; the workers
    need nothing from it (their functions live in importable modules), so they are told it is
    loaded.
    """
    path = os.environ.get(CALLER_MAIN_ENV)
    main = sys.modules.get("__main__")
    if path and main is not None and getattr(main, "__file__", None) is None:
        main.__file__ = path


_adopt_caller_main()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)  # the run's process is gone: nobody will read our results
        except PermissionError:  # alive, owned by another user
            pass


def _start_worker(
    parent_pid: int, initializer: Callable[..., None] | None, initargs: Sequence[Any]
) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _new_pool(
    workers: int, initializer: Callable[..., None] | None, initargs: Sequence[Any]
) -> cf.ProcessPoolExecutor:
    context = mp.get_context(START_METHOD)
    context.set_forkserver_preload(list(PRELOAD))
    caller_main = _caller_main_path()
    if caller_main:  # read by the fork server when it starts (once per process)
        os.environ[CALLER_MAIN_ENV] = caller_main
    return cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, tuple(initargs)),
    )


class PoolUnavailable(RuntimeError):
    """Worker processes cannot be started from this process; the caller works alone."""


def _check_interpreter() -> None:
    """Workers (and the fork server) run this interpreter again: the user must be allowed to.

    A process started as another user (``setpriv``, a service account) from an interpreter it
    cannot execute itself, e.g. one under a private home directory, could not start them.
    """
    executable = multiprocessing.spawn.get_executable()
    if not os.access(executable, os.X_OK):
        raise PoolUnavailable(
            f"this user cannot run the interpreter {os.fsdecode(executable)} to start workers"
        )


@contextlib.contextmanager
def ordered_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: Sequence[Any] = (),
) -> Iterator[Iterator[tuple[Any, Any]]]:
    """``with ordered_map(fn, items, workers=n) as results:`` yields ``(item, fn(item))`` pairs
    in the order of ``items``, computed by ``n`` worker processes.

    ``fn`` and ``initializer`` must be importable module-level functions; ``initializer(*initargs)``
    runs once in each worker (e.g. to keep a catalog there instead of sending it with every item).
    An exception raised by ``fn`` is returned in place of the result (with the worker's traceback
    as its ``__cause__``), so the caller keeps its own per-item error boundary. A worker that dies
    (killed, out of memory) fails the items in hand with :class:`BrokenProcessPool`; the remaining
    items go to a new pool. The workers are started on entry: :class:`PoolUnavailable` there
    means none could be, before any item was computed.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _check_interpreter()
    stream = _OrderedResults(fn, iter(items), workers, initializer, initargs)
    try:
        try:
            stream.start()
        except OSError as exc:  # e.g. the fork server could not be started or reached
            raise PoolUnavailable(f"worker processes cannot be started: {exc}") from exc
        yield iter(stream)
    finally:
        stream.shutdown()


class _OrderedResults:
    """The pools, the futures in flight (at most ``AHEAD_PER_WORKER`` per worker) and the items
    not yet submitted."""

    _done = object()

    def __init__(
        self,
        fn: Callable[[Any], Any],
        items: Iterator[Any],
        workers: int,
        initializer: Callable[..., None] | None,
        initargs: Sequence[Any],
    ) -> None:
        self.fn, self.items, self.workers = fn, items, workers
        self.initializer, self.initargs = initializer, initargs
        self.pools: list[cf.ProcessPoolExecutor] = []
        self.pending: deque[tuple[Any, cf.Future]] = deque()

    def start(self) -> None:
        self.pools.append(_new_pool(self.workers, self.initializer, self.initargs))
        for _ in range(self.workers * AHEAD_PER_WORKER):  # starts the workers
            self._submit_next()

    def shutdown(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def _submit_next(self) -> None:
        item = next(self.items, self._done)
        if item is self._done:
            return
        try:
            future = self.pools[-1].submit(self.fn, item)
        except BrokenProcessPool:  # a worker died since the last result: start a new pool
            self.pools[-1].shutdown(wait=True, cancel_futures=True)
            self.pools.append(_new_pool(self.workers, self.initializer, self.initargs))
            future = self.pools[-1].submit(self.fn, item)
        self.pending.append((item, future))

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        while self.pending:
            item, future = self.pending.popleft()
            try:
                result = future.result()
            except Exception as exc:  # fn's own error, or BrokenProcessPool
                result = exc
            self._submit_next()
            yield item, result
