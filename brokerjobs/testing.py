"""Test an app without RabbitMQ: the real Worker, Publisher and ParkingLot on the in-memory broker.

>>> async with TestBroker(app) as broker:
...     await broker.publish(SendEmail(to="a@example.com", subject="hi"))
...     await broker.run_until_idle()
...     assert broker.completed(SendEmail) == [SendEmail(to="a@example.com", subject="hi")]

Only the broker is replaced: ``brokerjobs.broker.memory.MemoryBroker`` fills the broker seam under
the real ``Worker`` (its sessions, consumers, delivery pipeline and settlement), ``Publisher``
and ``ParkingLot``. It plays routing (topic patterns, exchange-to-exchange bindings, the default
exchange), mandatory publishing (``UnroutableJob``), priorities, prefetch, TTLs that expire at a
queue's head and dead-lettering with ``x-death``. Retry tiers and delay levels wait on a virtual
clock: an hour-long retry takes no real time, and handlers take no virtual time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

from pydantic import BaseModel, SecretStr

from brokerjobs.app import App
from brokerjobs.broker.memory import CallbackFailed, MemoryBroker, MemoryChannel, MemoryConnection
from brokerjobs.envelope import CONTENT_TYPE, Delivery, OutgoingMessage, new_job_id
from brokerjobs.errors import ConfigError
from brokerjobs.jobs import spec_of
from brokerjobs.middleware import JobRun, Middleware
from brokerjobs.outcomes import Outcome
from brokerjobs.parked import ParkedJob
from brokerjobs.parking import ParkingLot
from brokerjobs.publisher import Publisher
from brokerjobs.settings import Settings, load_settings
from brokerjobs.telemetry import Telemetry
from brokerjobs.topology import parking_queue_name
from brokerjobs.worker import Worker

J = TypeVar("J", bound=BaseModel)
# Settings point here: nothing in a TestBroker may reach for a real broker.
_OFFLINE_URL = "amqp://brokerjobs-testbroker.invalid/"
START_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """How one delivery was settled, in settling order."""

    queue: str
    job_name: str
    job_id: str
    attempt: int
    action: Outcome  # completed, retried or parked
    at: float  # virtual seconds since the broker started
    delivery: Delivery = field(repr=False, compare=False)
    retry_delay: float | None = None  # the tier a retried job waits in
    reason: str | None = None  # the failure (retried), the park reason (parked), why skipped


class _Recorder(Middleware):
    """Notes each settled delivery for the test's assertions (the pipeline's last word)."""

    def __init__(self, broker: TestBroker) -> None:
        self._broker = broker

    async def after_settle(self, run: JobRun) -> None:
        settled = run.settled
        if settled is None or settled.outcome is Outcome.REQUEUED:
            return
        delivery = run.delivery
        self._broker.outcomes.append(
            JobOutcome(
                run.queue,
                delivery.job_name or delivery.routing_key,
                delivery.message_id or "",
                delivery.attempt,
                settled.outcome,
                self._broker.now,
                delivery,
                settled.retry_delay,
                settled.reason,
            )
        )


class TestBroker:
    """Runs ``app``'s worker in-process on the in-memory broker, retries on a virtual clock.

    Consumes every queue of the app (or ``queues``) as ``brokerjobs worker`` would.
    """

    __test__: ClassVar[bool] = False  # a helper, not a pytest test class

    def __init__(
        self,
        app: App,
        settings: Settings | None = None,
        *,
        queues: Iterable[str] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.app = app
        offline = {"url": SecretStr(_OFFLINE_URL), "connect_timeout": 0.1, "health_port": None}
        self.settings = (settings or load_settings()).model_copy(update=offline)
        self.telemetry = telemetry or Telemetry()
        self.topology = app.topology()
        self.outcomes: list[JobOutcome] = []
        self.memory = MemoryBroker(hold_roles={"worker"})  # the worker's deliveries wait
        """The broker itself: ``memory.clock``, ``memory.channel_failures``, ... """
        selected = app.select_queues(queues)
        self.worker: Worker | None = None
        """The real worker (None when ``queues=()``: nothing is consumed)."""
        if selected:
            self.worker = Worker(
                app,
                self.settings,
                queues=selected,
                telemetry=self.telemetry,
                broker=self.memory,
                middleware=[_Recorder(self)],
            )
        self.publisher = Publisher(
            self.settings,
            exchange=app.exchange,
            telemetry=self.telemetry,
            delay_levels=app.delay_levels,
            broker=self.memory,
            middleware=app.middleware,
        )
        """A real ``Publisher`` into this broker: hand it to the code under test."""
        self._running: asyncio.Task[None] | None = None
        self._raw: MemoryConnection | None = None  # for publish_message, opened once
        self._raw_channel: MemoryChannel | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Declare the app's topology and start its worker (``async with`` does this)."""
        await self.memory.declare_plan(self.topology)
        worker = self.worker
        if worker is None:
            return
        self._running = asyncio.create_task(worker.run(), name="bj-test-worker")
        async with asyncio.timeout(START_TIMEOUT_S):
            while not worker.ready and not self._running.done():  # noqa: ASYNC110
                await asyncio.sleep(0)  # the worker's start-up is a few loop turns, no I/O
        if self._running.done():
            self._running.result()  # the start-up error (a ConfigError, say)

    async def close(self) -> None:
        """Stop the worker: handlers still running are cancelled, their jobs requeued."""
        await self.publisher.close()
        if self._raw is not None:
            await self._raw.close()
        if self._running is None or self.worker is None:
            return
        self.worker.stop()
        await asyncio.wait_for(self._running, self.settings.shutdown_grace + 10)

    # -- publishing ----------------------------------------------------------------------------

    async def publish(
        self,
        job: BaseModel,
        *,
        priority: int | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        delay: float | timedelta | None = None,
    ) -> str:
        """Publish as ``Publisher.publish`` does (it is the real one); raises UnroutableJob."""
        return await self.publisher.publish(
            job, priority=priority, job_id=job_id, headers=headers, delay=delay
        )

    async def publish_raw(
        self,
        body: bytes,
        routing_key: str,
        *,
        content_type: str | None = CONTENT_TYPE,
        headers: Mapping[str, Any] | None = None,
        exchange: str | None = None,
    ) -> str:
        """Publish bytes as a foreign client might (no ``type``: the routing key names the job).

        ``exchange`` defaults to the app's; ``""`` sends to the queue named ``routing_key``.
        """
        message = OutgoingMessage(body, new_job_id(), None, 0, dict(headers or {}))
        message.content_type = content_type
        await self.publish_message(message, routing_key, exchange=exchange)
        return message.message_id

    async def publish_message(
        self, message: OutgoingMessage, routing_key: str, *, exchange: str | None = None
    ) -> None:
        """Publish a message built by hand (any property, e.g. ``expiration_ms``)."""
        target = self.topology.exchange if exchange is None else exchange
        channel = self._raw_channel
        if channel is None or channel.is_closed:  # a missing exchange closes it, as in RabbitMQ
            if self._raw is None or self._raw.is_closed:
                self._raw = await self.memory.connect("test-publish")
            channel = self._raw_channel = await self._raw.channel(confirms=True)
        await channel.publish(message, target, routing_key)

    # -- running -------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Virtual seconds since the broker started."""
        return self.memory.clock.now

    async def run_until_idle(self, *, advance_clock: bool = True) -> None:
        """Deliver until nothing is left to do; handler errors that escape brokerjobs raise here.

        Retries and delayed jobs wait on the virtual clock, which jumps ahead to each one until
        every job is completed or parked. ``advance_clock=False`` stops at the current time
        instead, leaving retries in their tiers (see ``advance``).
        """
        await self._settled(self.memory.run_until_idle(advance_clock=advance_clock))

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, delivering whatever becomes due on the way."""
        if seconds < 0:
            raise ValueError("virtual time only moves forward")
        await self._settled(self.memory.advance(seconds))

    async def _settled(self, running: Any) -> None:
        try:
            await running
        except CallbackFailed as exc:
            raise (exc.__cause__ or exc) from None
        # Missing queues are part of normal operation (the worker looks for obsolete retry
        # tiers); a delivery settled twice is a bug RabbitMQ punishes by closing the channel.
        settled_twice = [f for f in self.memory.channel_failures if "unknown delivery tag" in f]
        if settled_twice:
            raise RuntimeError("the broker closed a channel: " + "; ".join(settled_twice))

    # -- looking inside ------------------------------------------------------------------------

    def completed(self, job_type: type[J], queue: str | None = None) -> list[J]:
        """The jobs of ``job_type`` handled successfully (once per queue that handled them)."""
        name = spec_of(job_type).name
        return [
            job_type.model_validate_json(o.delivery.body)
            for o in self.outcomes
            if o.action == "completed" and o.job_name == name and queue in (None, o.queue)
        ]

    def queue_depths(self) -> dict[str, int]:
        """Ready messages in every planned queue (main, retry tiers, parking, delay levels)."""
        depths = self.memory.queue_depths()
        return {q.name: depths.get(q.name, 0) for q in self.topology.queues}

    def messages(self, queue: str) -> list[Delivery]:
        """The ready messages of any planned queue, in delivery order; they stay queued."""
        self.topology.queue(queue)  # a clear error for unknown names
        return self.memory.messages(queue)

    def parked(self, queue: str) -> list[ParkedJob]:
        """The parked jobs of main queue ``queue``, each with its failure envelope."""
        return [ParkedJob(delivery) for delivery in self.messages(self._parking_of(queue))]

    async def replay(self, queue: str) -> int:
        """Send every parked job of ``queue`` back to it, as ``brokerjobs parked replay`` does."""
        main = self.topology.queue(self._parking_of(queue)).main
        async with ParkingLot(self.settings, main, broker=self.memory) as lot:
            return (await lot.replay()).replayed  # the replayed jobs wait for the next run

    def _parking_of(self, queue: str) -> str:
        planned = self.topology.queue(queue)
        if planned.role == "parking":
            return planned.name
        if not planned.main:
            raise ConfigError(f"queue {queue!r} is not a main queue: it has no parking queue")
        return parking_queue_name(planned.main)


__all__ = ["JobOutcome", "Outcome", "TestBroker"]
