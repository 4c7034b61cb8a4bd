"""One broker seam, two brokers: the in-memory one and RabbitMQ (through a TCP proxy to cut).

A ``Seam`` hands out unique ``bjtest.*`` names (deleted again at the end on RabbitMQ), connections
(closed at the end) and one way to wait: ``until(predicate, after=seconds)``. In memory the clock
moves ``after`` virtual seconds and the broker runs until idle, then the predicate must hold; on
RabbitMQ the predicate is polled until a real deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from brokerjobs.broker.amqp import AmqpBroker, connect
from brokerjobs.broker.base import Broker, BrokerChannel, BrokerConnection
from brokerjobs.broker.memory import MemoryBroker
from brokerjobs.envelope import Delivery, OutgoingMessage, new_job_id
from tests.support.broker import TEST_HOST, TEST_PORT, TEST_URL, make_settings, unique, wait_for
from tests.support.proxy import TcpProxy

Predicate = Callable[[], bool | Awaitable[bool]]
WAIT_S = 5.0  # real seconds RabbitMQ gets for what should take milliseconds


@dataclass
class Seam:
    kind: str
    broker: Broker
    memory: MemoryBroker | None = None
    proxy: TcpProxy | None = None
    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)
    connections: list[BrokerConnection] = field(default_factory=list)

    async def connect(self, role: str = "test") -> BrokerConnection:
        connection = await self.broker.connect(role)
        self.connections.append(connection)
        return connection

    async def queue(
        self, channel: BrokerChannel, arguments: Mapping[str, Any] | None = None
    ) -> str:
        name = unique("seam")
        self.queues.append(name)
        await channel.declare_queue(name, arguments or {})
        return name

    async def exchange(self, channel: BrokerChannel, kind: str = "topic") -> str:
        name = unique("seamx")
        self.exchanges.append(name)
        await channel.declare_exchange(name, kind)
        return name

    async def until(self, predicate: Predicate, *, after: float = 0.0) -> None:
        if self.memory is None:
            await wait_for(predicate, timeout=after + WAIT_S)
            return
        await self.memory.advance(after)
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        assert result, "condition not met once the memory broker was idle"

    def drop(self) -> None:
        """Every connection fails as in a network failure."""
        if self.memory is not None:
            self.memory.drop_connections()
        else:
            assert self.proxy is not None
            self.proxy.cut()

    async def cleanup(self) -> None:
        for connection in self.connections:
            await connection.close()
        if self.memory is not None:
            return
        admin = await connect(make_settings(), "tests")  # directly: the proxy may be cut
        try:
            channel = await admin.channel(confirms=False)
            for name in self.queues:
                await channel.delete_queue(name)
            for name in self.exchanges:
                await channel.delete_exchange(name)
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def open_seam(kind: str) -> AsyncIterator[Seam]:
    if kind == "memory":
        memory = MemoryBroker()
        seam = Seam("memory", memory, memory=memory)
        try:
            yield seam
        finally:
            await seam.cleanup()
        return
    async with TcpProxy(TEST_HOST, TEST_PORT) as proxy:
        settings = make_settings(url=proxy.url_for(TEST_URL))
        seam = Seam("rabbitmq", AmqpBroker(settings), proxy=proxy)
        try:
            yield seam
        finally:
            await seam.cleanup()


class Inbox:
    """A delivery callback that keeps what it gets."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    async def put(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def __len__(self) -> int:
        return len(self.deliveries)

    def __getitem__(self, index: int) -> Delivery:
        return self.deliveries[index]

    def has(self, count: int) -> Callable[[], bool]:
        return lambda: len(self.deliveries) == count


def message(
    body: bytes = b'{"n": 1}',
    *,
    priority: int | None = None,
    headers: dict[str, Any] | None = None,
    expiration_ms: int | None = None,
) -> OutgoingMessage:
    return OutgoingMessage(
        body=body,
        message_id=new_job_id(),
        job_name="seam.job",
        priority=priority,
        headers=dict(headers or {}),
        expiration_ms=expiration_ms,
    )


async def depth_is(channel: BrokerChannel, queue: str, messages: int) -> bool:
    return (await channel.inspect_queue(queue)).messages == messages


def bounded(seconds: float) -> Callable[[Any], Any]:
    """Fail a test that runs longer than ``seconds`` (the suite has no pytest-timeout)."""

    def wrap(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(test)
        async def run(*args: Any, **kwargs: Any) -> None:
            async with asyncio.timeout(seconds):
                await test(*args, **kwargs)

        return run

    return wrap
