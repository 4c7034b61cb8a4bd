"""Helpers of the fault tests (``tests/integration/test_*_faults.py``): worker processes of the
fault app, waiting on their records, and a TcpProxy between an in-process Worker and the broker.

The process tests run ``python -m brokerjobs.cli worker tests.support.fault_app:app``; its handler
appends ``start``/``done`` records to a file with one ``write(2)`` each, so the records survive a
SIGKILL of the worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from brokerjobs import App, Publisher, Settings, Worker
from brokerjobs.provision import declare
from tests.support.broker import TEST_URL, Broker, make_settings, wait_for
from tests.support.child import LoggedProcess, child_env
from tests.support.fault_app import (
    LOG_ENV,
    NAME_ENV,
    SLEEP_ENV,
    SPREAD_ENV,
    FaultJob,
    build_app,
    read_records,
)
from tests.support.proxy import TcpProxy


class WorkerProcess(LoggedProcess):
    """A ``brokerjobs worker`` subprocess of the fault app; its output goes to a file."""

    def __init__(
        self,
        name: str,
        records: Path,
        output: Path,
        sleep: float,
        spread: float,
        settings: dict[str, str],
    ) -> None:
        extra = {
            "BROKERJOBS_LOG_LEVEL": "INFO",
            NAME_ENV: name,
            LOG_ENV: str(records),
            SLEEP_ENV: str(sleep),
            SPREAD_ENV: str(spread),
        }
        extra.update({f"BROKERJOBS_{k.upper()}": v for k, v in settings.items()})
        args = ["brokerjobs.cli", "worker", "tests.support.fault_app:app"]
        super().__init__(args, child_env(extra), output)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def exited(self, timeout: float) -> int:
        """Wait (without blocking the loop) for the process to exit; returns its exit code."""
        await wait_for(lambda: self.proc.poll() is not None, timeout, interval=0.01)
        return self.proc.returncode


@contextlib.contextmanager
def worker_processes() -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes through the yielded function; all are killed at the end."""
    started: list[WorkerProcess] = []

    def start(
        name: str, records: Path, output: Path, sleep: float, spread: float = 0.0, **settings: str
    ) -> WorkerProcess:
        """Settings are ``BROKERJOBS_<KEY>`` values, e.g. ``prefetch="20"``."""
        worker = WorkerProcess(name, records, output, sleep, spread, settings)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.kill()


async def consuming(
    broker: Broker, queue: str, worker: WorkerProcess, timeout: float = 15.0
) -> None:
    """Wait until the queue has a consumer; fail early, with the log, if the worker died."""

    async def ready() -> bool:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.log()}")
        return (await broker.state(queue)).consumers >= 1

    try:
        await wait_for(ready, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{worker.log()}") from None


async def fault_topology(broker: Broker, name: str, records: Path, sleep: float = 0.0) -> App:
    """The fault app (tracked for cleanup) with its topology declared."""
    app = broker.track(build_app(name, records, sleep))
    await declare(broker.connection, app.topology())
    return app


async def publish_jobs(exchange: str, count: int, start: int = 0) -> list[str]:
    """Publish ``count`` jobs with confirms; returns the confirmed job ids."""
    async with Publisher(make_settings(), exchange=exchange) as publisher:
        ids = await publisher.publish_many([FaultJob(n=start + i) for i in range(count)])
    assert len(set(ids)) == count
    return ids


async def all_processed(records: Path, confirmed: list[str], timeout: float) -> None:
    """Wait until every confirmed job has a ``done`` record; fail with how many are missing."""
    try:
        await wait_for(lambda: set(read_records(records).done_ids()) >= set(confirmed), timeout)
    except AssertionError:
        missing = set(confirmed) - set(read_records(records).done_ids())
        raise AssertionError(
            f"{len(missing)} of {len(confirmed)} confirmed jobs never processed in {timeout}s"
        ) from None


def duplicates(ids: list[str]) -> int:
    return sum(n - 1 for n in collections.Counter(ids).values())


async def depth_is(broker: Broker, queue: str, expected: int) -> bool:
    return await broker.depth(queue) == expected


def report(test: str, **counts: object) -> None:
    print(f"\n[{test}] " + " ".join(f"{k}={v}" for k, v in counts.items()))


async def finish_with(
    broker: Broker,
    queue: str,
    worker: WorkerProcess,
    records: Path,
    confirmed: list[str],
    timeout: float,
) -> None:
    """``worker`` consumes until every confirmed job is done, then stops cleanly (SIGTERM)."""
    await consuming(broker, queue, worker)
    await all_processed(records, confirmed, timeout)
    worker.signal(signal.SIGTERM)
    assert await worker.exited(15) == 0, worker.log()


@contextlib.asynccontextmanager
async def proxy_to_broker() -> AsyncIterator[TcpProxy]:
    broker_url = urlsplit(TEST_URL)
    async with TcpProxy(broker_url.hostname or "127.0.0.1", broker_url.port or 5672) as proxy:
        yield proxy


def proxied_settings(proxy: TcpProxy, **overrides: Any) -> Settings:
    """Test settings that reach the broker through ``proxy``, with a short heartbeat."""
    return make_settings(url=proxy.url_for(TEST_URL), heartbeat=2, **overrides)


@contextlib.asynccontextmanager
async def worker_task(
    app: App, settings: Settings
) -> AsyncIterator[tuple[Worker, asyncio.Task[None]]]:
    """An in-process worker and the task running it (to see it die, not just stay unready)."""
    worker = Worker(app, settings)
    task = asyncio.create_task(worker.run())
    try:
        await until_ready(worker, task)
        yield worker, task
    finally:
        worker.stop()
        with contextlib.suppress(Exception):  # its failure, if any, is the test's to report
            await asyncio.wait_for(task, 30)


async def until_ready(worker: Worker, task: asyncio.Task[None], timeout: float = 15.0) -> None:
    """Wait until the worker is ready; if its task ended instead, raise what ended it."""
    await wait_for(lambda: worker.ready or task.done(), timeout, interval=0.005)
    if task.done():
        error = None if task.cancelled() else task.exception()
        raise AssertionError(f"the worker died instead of reconnecting: {error!r}") from error
