"""Two ways to run one scenario: in memory (TestBroker) and on the real RabbitMQ (a real Worker).

A scenario defines an app, publishes, calls ``settle`` (the first call starts consuming, so jobs
published before it are waiting, as on a real broker) and asserts on what the handlers saw and
on the parked jobs. Each run reports time on its own clock: virtual seconds in memory, the event
loop's clock on RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol

from pydantic import BaseModel

from brokerjobs import App, Publisher
from brokerjobs.envelope import Delivery, OutgoingMessage, new_job_id
from brokerjobs.parked import ParkedJob
from brokerjobs.provision import declare
from brokerjobs.testing import TestBroker
from brokerjobs.topology import parking_queue_name
from tests.support.broker import (
    Broker,
    make_settings,
    open_broker,
    running_worker,
    unique,
    wait_for,
)

Done = Callable[[], bool]


class Run(Protocol):
    broker_version: tuple[int, ...]
    """The RabbitMQ version whose behaviour the run shows; () for TestBroker, which plays
    quorum queues without priorities."""

    async def publish(self, job: BaseModel, *, priority: int | None = None) -> str: ...

    async def publish_raw(self, body: bytes, routing_key: str) -> None: ...

    async def settle(self, done: Done, *, parked: Mapping[str, int] | None = None) -> None:
        """Consume until ``done()`` holds and each parking queue holds its count of jobs."""

    async def take_parked(self, queue: str) -> list[ParkedJob]: ...

    async def publish_to_queue(self, message: OutgoingMessage, queue: str) -> None:
        """Publish via the default exchange, straight to ``queue``."""

    async def take(self, queue: str, count: int) -> list[Delivery]:
        """Wait (without consuming) until ``queue`` holds ``count`` messages; take them."""

    def clock(self) -> float: ...


class Harness(Protocol):
    kind: str

    def app(self, label: str) -> App: ...

    def run(self, app: App, *, consume: bool = True) -> contextlib.AbstractAsyncContextManager[Run]:
        """Run ``app``; with ``consume=False`` no handler ever runs (to watch the queues)."""


def raw_message(body: bytes) -> OutgoingMessage:
    """What a foreign publisher sends: no ``type``, so the routing key names the job."""
    return OutgoingMessage(
        body=body, message_id=new_job_id(), job_name=None, priority=0, headers={}
    )


class MemoryRun:
    broker_version: tuple[int, ...] = ()

    def __init__(self, broker: TestBroker) -> None:
        self.broker = broker

    async def publish(self, job: BaseModel, *, priority: int | None = None) -> str:
        return await self.broker.publish(job, priority=priority)

    async def publish_raw(self, body: bytes, routing_key: str) -> None:
        await self.broker.publish_raw(body, routing_key)

    async def settle(self, done: Done, *, parked: Mapping[str, int] | None = None) -> None:
        await self.broker.run_until_idle()
        assert done(), "the scenario did not reach its end state"
        for queue, count in (parked or {}).items():
            assert len(self.broker.parked(queue)) == count, self.broker.queue_depths()

    async def take_parked(self, queue: str) -> list[ParkedJob]:
        return self.broker.parked(queue)

    async def publish_to_queue(self, message: OutgoingMessage, queue: str) -> None:
        await self.broker.publish_message(message, queue, exchange="")

    async def take(self, queue: str, count: int) -> list[Delivery]:
        await self.broker.run_until_idle()
        messages = self.broker.messages(queue)
        assert len(messages) == count, self.broker.queue_depths()
        return messages

    def clock(self) -> float:
        return self.broker.now


class MemoryHarness:
    kind = "memory"

    def app(self, label: str) -> App:
        return App(f"contract.{label}")

    @contextlib.asynccontextmanager
    async def run(self, app: App, *, consume: bool = True) -> AsyncIterator[Run]:
        async with TestBroker(app, make_settings(), queues=None if consume else ()) as broker:
            yield MemoryRun(broker)


class RabbitRun:
    def __init__(self, broker: Broker, app: App, publisher: Publisher, consume: bool) -> None:
        self.broker = broker
        self.app = app
        self.publisher = publisher
        self.stack = contextlib.AsyncExitStack()
        self._consume = consume
        self._consuming = False
        self.broker_version = broker.connection.server_version

    async def publish(self, job: BaseModel, *, priority: int | None = None) -> str:
        return await self.publisher.publish(job, priority=priority)

    async def publish_raw(self, body: bytes, routing_key: str) -> None:
        channel = await self.broker.fresh_channel()
        await channel.publish(raw_message(body), self.app.exchange, routing_key)

    async def settle(self, done: Done, *, parked: Mapping[str, int] | None = None) -> None:
        assert self._consume, "settle() needs a run that consumes"
        if not self._consuming:  # the first settle starts the worker
            await self.stack.enter_async_context(running_worker(self.app, make_settings()))
            self._consuming = True
        await wait_for(self._reached(done, parked or {}), timeout=15)

    def _reached(self, done: Done, parked: Mapping[str, int]) -> Callable[[], Awaitable[bool]]:
        async def reached() -> bool:
            for queue, count in parked.items():
                if await self.broker.depth(parking_queue_name(queue)) != count:
                    return False
            return done()

        return reached

    async def take_parked(self, queue: str) -> list[ParkedJob]:
        return [ParkedJob(d) for d in await self.broker.drain(parking_queue_name(queue))]

    async def publish_to_queue(self, message: OutgoingMessage, queue: str) -> None:
        await (await self.broker.fresh_channel()).publish(message, "", queue)

    async def take(self, queue: str, count: int) -> list[Delivery]:
        async def arrived() -> bool:
            return await self.broker.depth(queue) == count

        await wait_for(arrived, timeout=15)
        return await self.broker.drain(queue)

    def clock(self) -> float:
        return asyncio.get_running_loop().time()


class RabbitHarness:
    kind = "rabbitmq"

    def app(self, label: str) -> App:
        return App(unique(label))

    @contextlib.asynccontextmanager
    async def run(self, app: App, *, consume: bool = True) -> AsyncIterator[Run]:
        async with open_broker() as broker:
            broker.track(app)
            await declare(broker.connection, app.topology())
            async with Publisher(make_settings(), exchange=app.exchange) as publisher:
                run = RabbitRun(broker, app, publisher, consume)
                async with run.stack:
                    yield run
