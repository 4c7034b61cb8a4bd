"""The real components (Worker, Publisher, ParkingLot, Scheduler, StatusTracker) on either broker.

An ``Env`` hands a scenario a broker of the seam (RabbitMQ behind a TCP proxy, or the in-memory
one), settings, and two ways to make time pass: ``until(predicate)`` waits on the real broker and
drives the virtual clock on the in-memory one; ``drop_connections()`` cuts every connection as a
network failure would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from brokerjobs import App, Settings, Worker
from brokerjobs.broker.amqp import AmqpBroker
from brokerjobs.broker.base import Broker
from brokerjobs.broker.memory import MemoryBroker
from tests.support.broker import TEST_HOST, TEST_PORT, TEST_URL, make_settings, open_broker
from tests.support.broker import wait_for as wait_on_real_time
from tests.support.memory import Predicate, drive_until
from tests.support.proxy import TcpProxy


class Env(Protocol):
    kind: str
    broker: Broker
    settings: Settings

    def track(self, app: App) -> App: ...

    async def until(self, predicate: Predicate, timeout: float = 15.0) -> None: ...

    async def drop_connections(self) -> None: ...


class AmqpEnv:
    kind = "amqp"

    def __init__(self, proxy: TcpProxy, track: Callable[[App], App]) -> None:
        self._proxy = proxy
        self._track = track
        self.settings = make_settings(url=proxy.url_for(TEST_URL), connect_timeout=10.0)
        self.broker: Broker = AmqpBroker(self.settings)

    def track(self, app: App) -> App:
        return self._track(app)

    async def until(self, predicate: Predicate, timeout: float = 15.0) -> None:
        await wait_on_real_time(predicate, timeout)

    async def drop_connections(self) -> None:
        self._proxy.cut()


class MemoryEnv:
    kind = "memory"

    def __init__(self) -> None:
        self.memory = MemoryBroker()
        self.broker: Broker = self.memory
        self.settings = make_settings(url="amqp://guest:guest@memory.invalid/")

    def track(self, app: App) -> App:
        return app

    async def until(self, predicate: Predicate, timeout: float = 15.0) -> None:
        await drive_until(self.memory, predicate, timeout)

    async def drop_connections(self) -> None:
        self.memory.drop_connections()


@contextlib.asynccontextmanager
async def open_env(kind: str) -> AsyncIterator[Env]:
    if kind == "memory":
        yield MemoryEnv()
        return
    async with open_broker() as inspector, TcpProxy(TEST_HOST, TEST_PORT) as proxy:
        yield AmqpEnv(proxy, inspector.track)


@contextlib.asynccontextmanager
async def running(worker: Worker, env: Env) -> AsyncIterator[Worker]:
    """Run ``worker`` until the block ends (graceful stop), ready before the block starts."""
    task = asyncio.create_task(worker.run())
    try:
        await env.until(lambda: worker.ready or task.done(), 10.0)
        if task.done():
            task.result()
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
