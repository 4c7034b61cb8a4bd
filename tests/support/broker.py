"""Test support for the real broker: unique names, cleanup, waiting with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from brokerjobs import App, Settings, Worker
from brokerjobs.broker.amqp import Channel, Connection, connect
from brokerjobs.broker.base import QueueState
from brokerjobs.envelope import Delivery
from tests.support.hygiene import record_declarations
from tests.support.matrix import force_queue_kind

TEST_URL = os.environ.get("BROKERJOBS_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")
_TEST_PARTS = urlsplit(TEST_URL)
TEST_HOST = _TEST_PARTS.hostname or "127.0.0.1"
TEST_PORT = _TEST_PARTS.port or 5672

# Every process that imports the test support records what it declares and follows the matrix.
record_declarations()
force_queue_kind()


def url_with(
    *, user: str | None = None, password: str | None = None, port: int | None = None
) -> str:
    """``TEST_URL`` with other credentials or another port (same host and vhost)."""
    user = _TEST_PARTS.username if user is None else user
    password = _TEST_PARTS.password if password is None else password
    netloc = f"{user}:{password}@{TEST_HOST}:{TEST_PORT if port is None else port}"
    return _TEST_PARTS._replace(netloc=netloc).geturl()


# Headers the broker sets and counts itself (quorum queues' delivery count, dead-lettering
# history): never compared as a job's payload, because they differ by version and queue kind.
BROKER_HEADERS = ("x-delivery-count", "x-death", "x-first-death-", "x-last-death-")


def own_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """``headers`` without the broker-managed ones."""
    return {k: v for k, v in headers.items() if not k.startswith(BROKER_HEADERS)}


def unique(prefix: str = "t") -> str:
    return f"bjtest.{prefix}.{uuid.uuid4().hex[:10]}"


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "url": TEST_URL,
        "connect_timeout": 5.0,
        "shutdown_grace": 5.0,
        "heartbeat": 5,
        "prefetch": 10,
    }
    values.update(overrides)
    return Settings(**values)


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until true; fail with a clear message at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class Broker:
    """An inspection connection plus cleanup of everything a test's apps declared."""

    def __init__(self, connection: Connection, channel: Channel) -> None:
        self.connection = connection
        self.channel = channel
        self._queues: set[str] = set()
        self._exchanges: set[str] = set()

    def track(self, app: App) -> App:
        topology = app.topology()
        self._exchanges.update((topology.exchange, *topology.exchanges))
        self._queues.update(q.name for q in topology.queues)
        return app

    def track_queue(self, name: str) -> None:
        self._queues.add(name)

    def track_exchange(self, name: str) -> None:
        self._exchanges.add(name)

    async def depth(self, queue: str) -> int:
        return (await self.state(queue)).messages

    async def depth_is(self, queue: str, expected: int) -> bool:
        """For ``wait_for``: ``await wait_for(lambda: broker.depth_is(q, 1))``."""
        return await self.depth(queue) == expected

    async def state(self, queue: str) -> QueueState:
        return await (await self.fresh_channel()).inspect_queue(queue)

    async def fresh_channel(self) -> Channel:
        if self.channel.is_closed:
            self.channel = await self.connection.channel(confirms=True)
        return self.channel

    async def drain(self, queue: str) -> list[Delivery]:
        """Take every message currently in ``queue`` (acked)."""
        channel = await self.fresh_channel()
        taken: list[Delivery] = []
        while (delivery := await channel.get(queue)) is not None:
            await channel.ack(delivery.delivery_tag)
            taken.append(delivery)
        return taken

    async def cleanup(self) -> None:
        channel = await self.connection.channel(confirms=False)
        for queue in self._queues:
            with contextlib.suppress(Exception):
                await channel.delete_queue(queue)
        for exchange in self._exchanges:
            with contextlib.suppress(Exception):
                await channel.delete_exchange(exchange)


@contextlib.asynccontextmanager
async def open_broker() -> AsyncIterator[Broker]:
    connection = await connect(make_settings(), "tests")
    broker = Broker(connection, await connection.channel(confirms=True))
    try:
        yield broker
    finally:
        await broker.cleanup()
        await connection.close()


@contextlib.asynccontextmanager
async def running_worker(
    app: App, settings: Settings | None = None, ready_timeout: float = 10.0
) -> AsyncIterator[Worker]:
    """Run a Worker in this event loop until the block ends (graceful stop)."""
    worker = Worker(app, settings or make_settings())
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: worker.ready or task.done(), ready_timeout)
        if task.done():
            task.result()
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
