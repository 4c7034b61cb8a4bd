"""Where plain ``def`` handlers run, and what happens to one that outlives its timeout.

A thread cannot be stopped from outside: a timed-out thread handler keeps its thread until it
returns. The pool therefore has spare threads (``sync_workers``, at least 8) that only
timed-out handlers use, so the configured concurrency stays available; the job's id is not run
again while its abandoned thread still runs; and the worker stops being ready once abandoned
threads hold every spare thread, the point from which they eat into that concurrency.

A process can be stopped: a process handler past its timeout has its process killed and
replaced (Celery's hard time limit), so it frees its slot at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

log = logging.getLogger("brokerjobs.executors")


MIN_HEADROOM = 8  # spare threads for timed-out handlers, at least as many as sync_workers


class StillRunning(Exception):
    """The same job's earlier, timed-out run still holds a thread."""


class ThreadRunner:
    """``sync_workers`` concurrent thread handlers, plus spare threads for abandoned ones."""

    def __init__(self, workers: int, headroom: int | None = None, name: str = "bj-sync") -> None:
        self.workers = workers
        # Threads are only started when needed: headroom costs nothing until a timeout.
        self.headroom = max(workers, MIN_HEADROOM) if headroom is None else headroom
        self._pool = concurrent.futures.ThreadPoolExecutor(workers + self.headroom, name)
        self._slots = asyncio.Semaphore(workers)  # an abandoned run gives its slot back
        self._lock = threading.Lock()
        self._abandoned: dict[str, int] = {}  # job id -> timed-out runs still in a thread

    @property
    def abandoned(self) -> int:
        """Timed-out handlers whose threads are still running."""
        with self._lock:
            return sum(self._abandoned.values())

    def problem(self) -> str | None:
        """Why thread handlers cannot run at full concurrency, or None."""
        held = self.abandoned
        if held < self.headroom:
            return None
        free = min(max(self.workers + self.headroom - held, 0), self.workers)
        return (
            f"{held} timed-out sync handler(s) still run and hold every spare thread: "
            f"{free} of {self.workers} sync slots left (BROKERJOBS_SYNC_WORKERS)"
        )

    async def run(self, job_id: str, func: Callable[[Any], object], arg: object) -> object:
        with self._lock:
            if self._abandoned.get(job_id):
                raise StillRunning(
                    f"an earlier timed-out run of job {job_id} still runs in a thread"
                )
        context = contextvars.copy_context()  # the handler sees current_job() in its thread
        async with self._slots:
            future = self._pool.submit(context.run, func, arg)
            try:
                return await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                if not future.cancel():  # already running: it keeps its thread until it returns
                    self._abandon(job_id, future)
                raise

    def _abandon(self, job_id: str, future: concurrent.futures.Future[object]) -> None:
        with self._lock:
            self._abandoned[job_id] = self._abandoned.get(job_id, 0) + 1

        def release(_: object) -> None:
            with self._lock:
                left = self._abandoned.get(job_id, 1) - 1
                if left > 0:
                    self._abandoned[job_id] = left
                else:
                    self._abandoned.pop(job_id, None)
            log.info("timed-out handler of job %s returned; its thread is free again", job_id)

        future.add_done_callback(release)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ProcessRunner:
    """Process handlers, one job per process at a time; a timed-out one's process is killed."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size or os.cpu_count() or 1
        self._slots = asyncio.Semaphore(self.size)
        self._idle: list[_Process] = []
        self.killed = 0

    async def run(self, func: Callable[[Any], object], arg: object) -> object:
        async with self._slots:
            process = self._idle.pop() if self._idle else _Process()
            try:
                result = await process.call(func, arg)
            except asyncio.CancelledError:
                self.killed += 1
                log.warning("process handler %s stopped: killing pid %s", func, process.pid)
                process.kill()
                raise
            except RemoteError:
                process.kill()
                raise
            except BaseException:
                self._idle.append(process)  # the handler's own exception: the process is fine
                raise
            self._idle.append(process)
            return result

    def shutdown(self) -> None:
        for process in self._idle:
            process.kill()
        self._idle.clear()


class RemoteError(Exception):
    """A process handler raised an exception that could not be sent back as it was."""


def _serve(connection: Connection) -> None:
    """The child's loop: run each (func, arg) received and send back its outcome."""
    while True:
        try:
            func, arg = connection.recv()
        except EOFError:
            return
        try:
            outcome: tuple[bool, object] = (True, func(arg))
        except Exception as exc:
            outcome = (False, exc)
        try:
            connection.send(outcome)
        except Exception as exc:  # an unpicklable result or exception
            connection.send((False, RemoteError(f"{type(exc).__name__}: {exc}")))


class _Process:
    def __init__(self) -> None:
        import multiprocessing  # loaded only by apps with process handlers

        context = multiprocessing.get_context("forkserver")  # safe beside threads, unlike fork
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        child.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def call(self, func: Callable[[Any], object], arg: object) -> object:
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()
        fd = self._conn.fileno()
        loop.add_reader(fd, _set_once, readable)
        try:
            self._conn.send((func, arg))
            await readable
            ok, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise RemoteError(
                f"the handler's process died (exit {self._process.exitcode})"
            ) from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an outcome that cannot be unpickled here
            raise RemoteError(f"unreadable outcome: {type(exc).__name__}: {exc}") from exc
        finally:
            loop.remove_reader(fd)
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value

    def kill(self) -> None:
        self._process.kill()
        self._process.join(timeout=5)
        self._conn.close()


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Executors:
    """The thread and process runners of one worker (the process one made on first use)."""

    def __init__(self, sync_workers: int, *, name: str = "bj-sync") -> None:
        self.threads = ThreadRunner(sync_workers, name=name)
        self._processes: ProcessRunner | None = None

    @property
    def processes(self) -> ProcessRunner:
        if self._processes is None:
            self._processes = ProcessRunner()
        return self._processes

    def problem(self) -> str | None:
        return self.threads.problem()

    def shutdown(self) -> None:
        self.threads.shutdown()
        if self._processes is not None:
            self._processes.shutdown()
