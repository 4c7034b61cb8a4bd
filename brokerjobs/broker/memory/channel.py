"""One in-memory channel: publish (confirmed at once), consume with prefetch, ack, topology.

Channel errors close the channel as RabbitMQ does: a missing queue or exchange (404), other
arguments (406), a refused delete (406), an unknown delivery tag (406, "settled twice?").
The operation raises its ``TopologyError`` (an ack of an unknown tag returns, as the broker
only closes the channel afterwards; the reason is logged and is ``closing``'s result). From
then on every operation raises ``ConnectionLost`` (a publish: ``PublishInterrupted``, as on
AMQP), unacked deliveries return to their queues as redelivered and the callbacks still
running are cancelled (as aiormq does).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from brokerjobs.broker.base import Around, DeliveryCallback, QueueState
from brokerjobs.broker.memory.core import Core
from brokerjobs.broker.memory.deaths import delivery_of
from brokerjobs.broker.memory.queues import Consumer, MemoryQueue, Stored
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.errors import (
    ConnectionLost,
    PublishError,
    PublishInterrupted,
    TopologyError,
    UnroutableJob,
)

log = logging.getLogger("brokerjobs.broker.memory")


@dataclass(slots=True)
class _Unacked:
    queue: MemoryQueue
    stored: Stored
    consumer: Consumer | None  # None: taken with get


class MemoryChannel:
    """A ``BrokerChannel`` on a ``MemoryBroker``."""

    def __init__(
        self, core: Core, owner: object, number: int, *, confirms: bool, prefetch: int | None
    ) -> None:
        loop = asyncio.get_running_loop()
        self._core = core
        self._owner = owner  # the connection: exclusive queues belong to it
        self.number = number
        self.confirms = confirms
        self._prefetch = prefetch or None
        self._closing: asyncio.Future[Any] = loop.create_future()
        self._cancelled: asyncio.Future[str] = loop.create_future()
        self._tags = itertools.count(1)
        self._consumer_tags = itertools.count(1)
        self._unacked: dict[int, _Unacked] = {}
        self._consumers: dict[str, Consumer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.close_reason: BaseException | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def prefetch(self) -> int | None:
        return self._prefetch

    @property
    def closing(self) -> asyncio.Future[Any]:
        return self._closing

    @property
    def consumer_cancelled(self) -> asyncio.Future[str]:
        return self._cancelled

    @property
    def is_closed(self) -> bool:
        return self._closing.done()

    @property
    def unconfirmed(self) -> int:
        return 0  # every publish is confirmed before it returns

    @property
    def unacked(self) -> int:
        """Deliveries of this channel not settled yet."""
        return len(self._unacked)

    async def close(self) -> None:
        self.shut(None)

    def shut(self, reason: BaseException | None) -> None:
        """Close now: ``reason`` None for a close the client asked for, else why it failed."""
        if self._closing.done():
            return
        self.close_reason = reason
        self._closing.set_result(reason)
        self.detach_consumers()
        for tag in sorted(self._unacked):
            entry = self._unacked.pop(tag)
            self._core.give_back(entry.queue, entry.stored)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self._core.dispatch()  # given back, or a single active consumer's successor

    def detach_consumers(self) -> None:
        for consumer in self._consumers.values():
            self._detach(consumer)
        self._consumers.clear()

    def _detach(self, consumer: Consumer) -> None:
        queue = self._core.queues.get(consumer.queue)
        if queue is not None:
            queue.remove_consumer(consumer)

    def _require_open(self, what: str) -> None:
        if self._closing.done():
            why = f": {self.close_reason}" if self.close_reason is not None else ""
            raise ConnectionLost(f"{what}: memory channel {self.number} is closed{why}")

    @contextlib.contextmanager
    def _channel_errors(self, what: str) -> Iterator[None]:
        """An operation on an open channel; a refusal closes it, as RabbitMQ's would."""
        self._require_open(what)
        try:
            yield
        except TopologyError as exc:
            self._core.channel_failures.append(f"{what}: {exc}")
            self.shut(ConnectionLost(f"{what}: the broker closed the channel: {exc}"))
            raise

    def _fail(self, reply: str) -> None:
        log.warning("memory channel %s closed by the broker: %s", self.number, reply)
        self._core.channel_failures.append(reply)
        self.shut(ConnectionLost(f"the broker closed memory channel {self.number}: {reply}"))

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        """Mandatory and confirmed at once: UnroutableJob when no queue is bound for it;
        PublishInterrupted on a closed channel (as AMQP's: the caller publishes again)."""
        if self._closing.done():
            raise PublishInterrupted(
                f"memory channel {self.number} is closed: job {message.message_id} was not "
                "published, publish it again"
            )
        with self._channel_errors(f"publishing job {message.message_id}"):
            routed = self._core.enqueue(message, exchange, routing_key)
        if not routed:
            raise UnroutableJob(
                f"job {message.job_name!r} ({message.message_id}) is unroutable: exchange "
                f"{exchange!r} has no queue bound for routing key {routing_key!r}. Declare the "
                "consumer's topology first (`brokerjobs topology declare MODULE:APP`)."
            )
        self._core.dispatch()

    async def publish_many(
        self,
        messages: Iterable[tuple[OutgoingMessage, str, str]],
        window: int,
        around: Around | None = None,
    ) -> list[tuple[OutgoingMessage, PublishError]]:
        """As ``publish`` for each; confirms are immediate, so ``window`` is moot."""
        failed: list[tuple[OutgoingMessage, PublishError]] = []
        for message, exchange, routing_key in messages:
            span = around(message, exchange, routing_key) if around else contextlib.nullcontext()
            try:
                with span:
                    await self.publish(message, exchange, routing_key)
            except PublishError as exc:
                failed.append((message, exc))
        return failed

    # -- consuming and settling --------------------------------------------------------------

    async def consume(self, queue: str, callback: DeliveryCallback, *, no_ack: bool = False) -> str:
        with self._channel_errors(f"consuming {queue!r}"):
            target = self._core.queue(queue, self._owner)
        tag = f"ctag{self.number}.{next(self._consumer_tags)}"
        held = getattr(self._owner, "role", None) in self._core.held_roles
        consumer = Consumer(tag, queue, self, callback, no_ack, held=held)
        self._consumers[tag] = consumer
        target.consumers.append(consumer)
        self._core.dispatch()
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer (its unacked deliveries stay unacked); an unknown tag is a no-op."""
        self._require_open("cancelling a consumer")
        consumer = self._consumers.pop(consumer_tag, None)
        if consumer is not None:
            self._detach(consumer)
            self._core.dispatch()

    def cancelled_by_broker(self, consumer_tag: str) -> None:
        self._consumers.pop(consumer_tag, None)
        if not self._cancelled.done():
            self._cancelled.set_result(consumer_tag)

    def deliver(self, consumer: Consumer, queue: MemoryQueue, stored: Stored) -> None:
        """Called by dispatch: the delivery runs ``consumer.callback`` in a task of its own."""
        delivery = self._record(consumer, queue, stored)
        task = asyncio.get_running_loop().create_task(_run(consumer.callback, delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._core.track(task)

    def _record(self, consumer: Consumer | None, queue: MemoryQueue, stored: Stored) -> Delivery:
        tag = next(self._tags)
        if consumer is None or not consumer.no_ack:
            self._unacked[tag] = _Unacked(queue, stored, consumer)
            if consumer is not None:
                consumer.unacked += 1
        count = stored.returns if queue.quorum else None
        return delivery_of(stored, tag, delivery_count=count)

    async def get(self, queue: str) -> Delivery | None:
        """``basic.get`` with manual ack (prefetch does not apply), or None when empty."""
        with self._channel_errors(f"reading {queue!r}"):
            source = self._core.queue(queue, self._owner)
        self._core.expire()
        if not len(source):
            return None
        return self._record(None, source, source.pop())

    async def ack(self, delivery_tag: int) -> None:
        entry = self._settle("ack", delivery_tag)
        if entry is not None:
            self._core.dispatch()

    async def nack(self, delivery_tag: int, *, requeue: bool) -> None:
        entry = self._settle("nack", delivery_tag)
        if entry is None:
            return
        if requeue:
            self._core.give_back(entry.queue, entry.stored)
        elif not entry.queue.deleted:
            self._core.dead_letter(entry.queue, entry.stored, "rejected")
        self._core.dispatch()

    def _settle(self, what: str, delivery_tag: int) -> _Unacked | None:
        self._require_open(f"cannot {what}")
        entry = self._unacked.pop(delivery_tag, None)
        if entry is None:
            self._fail(
                f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag} (settled twice?)"
            )
            return None
        if entry.consumer is not None:
            entry.consumer.unacked -= 1
        return entry

    async def flush_acks(self) -> None:
        """Nothing waits: acks are applied when they are made."""

    # -- topology ----------------------------------------------------------------------------

    async def declare_exchange(self, name: str, kind: str) -> None:
        with self._channel_errors(f"declaring exchange {name!r}"):
            self._core.exchanges.declare(name, kind)

    async def declare_queue(self, name: str, arguments: Mapping[str, Any]) -> QueueState:
        with self._channel_errors(f"declaring queue {name!r}"):
            queue = self._core.declare_queue(name, arguments)
        return QueueState(name, len(queue), len(queue.consumers))

    async def declare_private_queue(self) -> str:
        self._require_open("declaring a private queue")
        name = self._core.private_name()
        self._core.declare_queue(name, {}, owner=self._owner)
        return name

    async def bind(self, queue: str, exchange: str, pattern: str) -> None:
        with self._channel_errors(f"binding queue {queue!r}"):
            self._core.bind(queue, exchange, pattern, self._owner)

    async def bind_exchange(self, destination: str, source: str, pattern: str) -> None:
        with self._channel_errors(f"binding exchange {destination!r}"):
            self._core.bind_exchange(destination, source, pattern)

    async def inspect_queue(self, name: str) -> QueueState:
        with self._channel_errors(f"inspecting queue {name!r}"):
            queue = self._core.queue(name, self._owner)
        self._core.expire()
        return QueueState(name, len(queue), len(queue.consumers))

    async def delete_queue(
        self, name: str, *, if_empty: bool = False, if_unused: bool = False
    ) -> None:
        with self._channel_errors(f"deleting queue {name!r}"):
            self._core.delete_queue(name, self._owner, if_empty, if_unused)

    async def delete_exchange(self, name: str) -> None:
        self._require_open(f"deleting exchange {name!r}")
        self._core.exchanges.delete(name)


async def _run(callback: DeliveryCallback, delivery: Delivery) -> None:
    await callback(delivery)
