"""Test an app without RabbitMQ: its real consumer, settlement and retry policy on in-memory queues.

>>> async with TestBroker(app) as broker:
...     await broker.publish(SendEmail(to="a@example.com", subject="hi"))
...     await broker.run_until_idle()
...     assert broker.completed(SendEmail) == [SendEmail(to="a@example.com", subject="hi")]

Only the wire is replaced. ``MemoryChannel`` stands in for ``transport.Channel`` under the real
``Publisher``, ``QueueConsumer``, ``Settlement`` and ``StatusEmitter``; the broker's part is played
from the app's topology plan: its exchanges and bindings (topic matching with ``topic_matches``,
exchange-to-exchange bindings, the default exchange), mandatory routing (``UnroutableJob``),
``x-max-priority``, prefetch, TTLs that expire at a queue's head, and dead-lettering to the targets
in each queue's arguments. Retry tiers and delay levels wait on a virtual clock: an hour-long retry
takes no real time, and handlers take no virtual time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar, cast

from pydantic import BaseModel, SecretStr

from brokerjobs.app import App
from brokerjobs.consumer import QueueConsumer, build_consumer
from brokerjobs.envelope import CONTENT_TYPE, Delivery, OutgoingMessage, new_job_id
from brokerjobs.errors import ConfigError
from brokerjobs.executors import Executors
from brokerjobs.jobs import spec_of
from brokerjobs.memory import MemoryChannel, _delivery, _Memory, _Queue
from brokerjobs.middleware import JobRun, Middleware
from brokerjobs.outcomes import Outcome
from brokerjobs.parking import ParkedJob, replay_message
from brokerjobs.publisher import Publisher
from brokerjobs.settings import Settings, load_settings
from brokerjobs.telemetry import Telemetry
from brokerjobs.topology import DEFAULT_EXCHANGE, parking_queue_name

J = TypeVar("J", bound=BaseModel)
# A run that keeps finding work after this many deliveries is a loop, not a test.
MAX_DELIVERIES_PER_RUN = 100_000
# Settings for the in-memory publisher point here: should it ever try to connect, it fails fast.
_OFFLINE_URL = "amqp://brokerjobs-testbroker.invalid/"


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
    reason: str | None = None  # the failure (retried) or the park reason (parked)


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


@dataclass(slots=True)
class _Consumer:
    queue: _Queue
    channel: MemoryChannel
    prefetch: int
    consumer: QueueConsumer


class TestBroker:
    """Runs ``app``'s handlers in-process on in-memory queues, retries on a virtual clock.

    Consumes every queue of the app (or ``queues``) as a worker would, with its prefetch.
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
        self.settings = settings or load_settings()
        self.telemetry = telemetry or Telemetry()
        self.topology = app.topology()
        self.outcomes: list[JobOutcome] = []
        self._memory = _Memory(self.topology)
        self._channel = MemoryChannel(self._memory)
        offline = {"url": SecretStr(_OFFLINE_URL), "connect_timeout": 0.1}
        self.publisher = Publisher(
            self.settings.model_copy(update=offline),
            exchange=app.exchange,
            telemetry=self.telemetry,
            delay_levels=app.delay_levels,
            channel=self._channel,
        )
        """A real ``Publisher`` into this broker: hand it to the code under test."""
        self._executors = Executors(self.settings.sync_workers, name="bj-test")
        self._consumers = [self._consumer(name) for name in app.select_queues(queues)]
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []

    def _consumer(self, queue: str) -> _Consumer:
        channel = MemoryChannel(self._memory)
        consumer = build_consumer(
            self.app,
            queue,
            channel,
            self.settings,
            self._executors,
            self.telemetry,
            [_Recorder(self)],
        )
        prefetch = self.app.queues[queue].prefetch or self.settings.prefetch
        return _Consumer(self._memory.queues[queue], channel, prefetch, consumer)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop handlers still running (their jobs are requeued) and the thread pool."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executors.shutdown()

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
        await self._channel.publish(message, target, routing_key)

    # -- running -------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Virtual seconds since the broker started."""
        return self._memory.now

    async def run_until_idle(self, *, advance_clock: bool = True) -> None:
        """Deliver until nothing is left to do; handler errors that escape brokerjobs raise here.

        Retries and delayed jobs wait on the virtual clock, which jumps ahead to each one until
        every job is completed or parked. ``advance_clock=False`` stops at the current time
        instead, leaving retries in their tiers (see ``advance``).
        """
        await self._run(until=None if advance_clock else self._memory.now)

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, delivering whatever becomes due on the way."""
        if seconds < 0:
            raise ValueError("virtual time only moves forward")
        target = round(self._memory.now + seconds, 6)
        await self._run(until=target)
        self._memory.now = max(self._memory.now, target)

    async def _run(self, until: float | None) -> None:
        deliveries = 0
        while True:
            self._memory.expire()
            deliveries += self._dispatch()
            if deliveries > MAX_DELIVERIES_PER_RUN:
                raise RuntimeError(
                    f"still busy after {MAX_DELIVERIES_PER_RUN} deliveries: does a handler "
                    "publish jobs endlessly?"
                )
            if self._tasks:
                await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
                self._raise_errors()
                continue
            self._check_settled()
            due = self._memory.next_expiry()
            if due is None or (until is not None and due > until):
                return
            self._memory.now = max(self._memory.now, due)

    def _dispatch(self) -> int:
        """Hand ready messages to consumers, each up to its prefetch of unacked deliveries."""
        started = 0
        for c in self._consumers:
            while c.queue and len(c.channel.unacked) < c.prefetch:
                delivery = c.channel.deliver(c.queue, c.queue.pop())
                task = asyncio.create_task(c.consumer.on_delivery(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
                started += 1
        return started

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._errors.append(cast(BaseException, task.exception()))

    def _raise_errors(self) -> None:
        if self._errors:
            error, self._errors = self._errors[0], []
            raise error

    def _check_settled(self) -> None:
        for c in self._consumers:
            if c.channel.unacked:
                raise RuntimeError(
                    f"{len(c.channel.unacked)} delivery(ies) of {c.queue.plan.name!r} were "
                    "neither acked nor nacked after their handlers finished"
                )

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
        return {name: len(queue) for name, queue in self._memory.queues.items()}

    def messages(self, queue: str) -> list[Delivery]:
        """The ready messages of any planned queue, in delivery order; they stay queued."""
        self.topology.queue(queue)  # a clear error for unknown names
        return [_delivery(stored, 0) for stored in self._memory.queues[queue].ready()]

    def parked(self, queue: str) -> list[ParkedJob]:
        """The parked jobs of main queue ``queue``, each with its failure envelope."""
        return [ParkedJob(delivery) for delivery in self.messages(self._parking_of(queue))]

    async def replay(self, queue: str) -> int:
        """Send every parked job of ``queue`` back to it, as ``brokerjobs parked replay`` does."""
        parking = self._memory.queues[self._parking_of(queue)]
        replayed = 0
        while parking:
            job = ParkedJob(_delivery(parking.pop(), 0))
            await self._channel.publish(replay_message(job), DEFAULT_EXCHANGE, parking.plan.main)
            replayed += 1
        return replayed

    def _parking_of(self, queue: str) -> str:
        planned = self.topology.queue(queue)
        if planned.role == "parking":
            return planned.name
        if not planned.main:
            raise ConfigError(f"queue {queue!r} is not a main queue: it has no parking queue")
        return parking_queue_name(planned.main)


__all__ = ["JobOutcome", "MemoryChannel", "Outcome", "TestBroker"]
