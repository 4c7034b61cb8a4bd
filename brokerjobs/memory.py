"""The in-memory broker behind TestBroker: queues, routing from the topology plan, a virtual clock.

``MemoryChannel`` stands in for ``transport.Channel``; see ``brokerjobs.testing`` for what of
RabbitMQ is played here and how tests drive it.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import itertools
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from brokerjobs.broker.base import Around
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.errors import PublishError, TopologyError, UnroutableJob
from brokerjobs.topology import (
    DEFAULT_EXCHANGE,
    BindingPlan,
    QueuePlan,
    TopologyPlan,
    topic_matches,
)

# TestBroker's logger: dropped dead letters are reported where they always were.
log = logging.getLogger("brokerjobs.testing")


@dataclass(slots=True)
class _Stored:
    message: OutgoingMessage  # this queue's own copy, as published or dead-lettered
    exchange: str
    routing_key: str
    seq: int
    enqueued_at: float
    redelivered: bool = False


class _Queue:
    """A planned queue's ready messages: by priority where ``x-max-priority`` is set, else FIFO."""

    def __init__(self, plan: QueuePlan) -> None:
        self.plan = plan
        self._max_priority = int(plan.arguments.get("x-max-priority", 0))
        ttl = plan.arguments.get("x-message-ttl")
        self._ttl_ms = int(ttl) if ttl is not None else None
        self._heap: list[tuple[int, int, _Stored]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, stored: _Stored) -> None:
        # A requeued message keeps its sequence number: it goes back to its old place.
        priority = min(stored.message.priority or 0, self._max_priority)
        heapq.heappush(self._heap, (-priority, stored.seq, stored))

    def pop(self) -> _Stored:
        return heapq.heappop(self._heap)[2]

    def ready(self) -> list[_Stored]:
        return [entry[2] for entry in sorted(self._heap)]

    def head_expires_at(self) -> float | None:
        """When the head expires: TTLs only fire at a queue's head, in RabbitMQ as here."""
        if not self._heap:
            return None
        head = self._heap[0][2]
        ttls = [ttl for ttl in (self._ttl_ms, head.message.expiration_ms) if ttl is not None]
        return round(head.enqueued_at + min(ttls) / 1000, 6) if ttls else None


class _Memory:
    """The broker's state: the plan's exchanges, bindings and queues, and the virtual clock."""

    def __init__(self, topology: TopologyPlan) -> None:
        self.now = 0.0
        self.queues = {q.name: _Queue(q) for q in topology.queues}
        self._exchanges = {topology.exchange, *topology.exchanges}
        self._bindings: dict[str, list[BindingPlan]] = defaultdict(list)
        for queue in topology.queues:
            for pattern in queue.patterns:
                binding = BindingPlan(topology.exchange, queue.name, pattern)
                self._bindings[topology.exchange].append(binding)
        for binding in topology.bindings:
            self._bindings[binding.source].append(binding)
        self._seq = itertools.count()

    def route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if exchange == DEFAULT_EXCHANGE:
            queue = self.queues.get(routing_key)
            return [queue] if queue is not None else []
        if exchange not in self._exchanges:
            known = ", ".join(sorted(self._exchanges))
            raise TopologyError(f"exchange {exchange!r} does not exist (the app's: {known})")
        names: dict[str, None] = {}  # ordered, and each queue gets one copy
        self._collect(exchange, routing_key, names, set())
        return [self.queues[name] for name in names]

    def _collect(self, exchange: str, key: str, names: dict[str, None], seen: set[str]) -> None:
        seen.add(exchange)
        for binding in self._bindings.get(exchange, ()):
            if not topic_matches(binding.pattern, key):
                continue
            if not binding.to_exchange:
                names[binding.destination] = None
            elif binding.destination not in seen:
                self._collect(binding.destination, key, names, seen)

    def enqueue(self, message: OutgoingMessage, exchange: str, routing_key: str) -> int:
        queues = self.route(exchange, routing_key)
        for queue in queues:
            own = replace(message, headers=copy.deepcopy(message.headers))
            queue.push(_Stored(own, exchange, routing_key, next(self._seq), self.now))
        return len(queues)

    def dead_letter(self, queue: _Queue, stored: _Stored, reason: str) -> None:
        arguments = queue.plan.arguments
        exchange = arguments.get("x-dead-letter-exchange")
        if exchange is None:
            return  # no dead-letter exchange: the broker discards it
        routing_key = arguments.get("x-dead-letter-routing-key", stored.routing_key)
        if not self.enqueue(_dead(stored, queue.plan.name, reason), exchange, routing_key):
            log.warning("dead letter from %s dropped: nothing bound for it", queue.plan.name)

    def expire(self) -> None:
        while (queue := self._first_expired()) is not None:
            self.dead_letter(queue, queue.pop(), "expired")

    def _first_expired(self) -> _Queue | None:
        for queue in self.queues.values():
            at = queue.head_expires_at()
            if at is not None and at <= self.now:
                return queue
        return None

    def next_expiry(self) -> float | None:
        times = (queue.head_expires_at() for queue in self.queues.values())
        return min((at for at in times if at is not None), default=None)


def _dead(stored: _Stored, queue: str, reason: str) -> OutgoingMessage:
    """The dead-lettered copy: RabbitMQ records the death in ``x-death`` and drops the TTL."""
    message = stored.message
    headers = dict(message.headers)
    deaths = [d for d in headers.get("x-death") or () if isinstance(d, dict)]
    same = [d for d in deaths if d.get("queue") == queue and d.get("reason") == reason]
    death: dict[str, Any] = {
        "count": int(same[0].get("count", 0)) + 1 if same else 1,
        "reason": reason,
        "queue": queue,
        "time": datetime.now(UTC).replace(microsecond=0),
        "exchange": stored.exchange,
        "routing-keys": [stored.routing_key],
    }
    if message.expiration_ms is not None:
        death["original-expiration"] = str(message.expiration_ms)
    headers["x-death"] = [death, *(d for d in deaths if d not in same)]
    headers.setdefault("x-first-death-exchange", stored.exchange)
    headers.setdefault("x-first-death-queue", queue)
    headers.setdefault("x-first-death-reason", reason)
    return replace(message, headers=headers, expiration_ms=None)


def _delivery(stored: _Stored, tag: int) -> Delivery:
    message = stored.message
    return Delivery(
        body=message.body,
        delivery_tag=tag,
        exchange=stored.exchange,
        routing_key=stored.routing_key,
        redelivered=stored.redelivered,
        message_id=message.message_id,
        job_name=message.job_name,
        content_type=message.content_type,
        priority=message.priority,
        timestamp=message.timestamp,
        headers=copy.deepcopy(message.headers),
        correlation_id=message.correlation_id,
        app_id=message.app_id,
        expiration=str(message.expiration_ms) if message.expiration_ms is not None else None,
        delivery_mode=message.delivery_mode,
        content_encoding=message.content_encoding,
        reply_to=message.reply_to,
        user_id=message.user_id,
        cluster_id=message.cluster_id,
    )


class MemoryChannel:
    """Stands in for ``transport.Channel``: publish (mandatory, confirmed at once), ack, nack."""

    def __init__(self, memory: _Memory) -> None:
        self._memory = memory
        self._tags = itertools.count(1)
        self.unacked: dict[int, tuple[_Queue, _Stored]] = {}

    async def publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        if not self._memory.enqueue(message, exchange, routing_key):
            raise UnroutableJob(
                f"job {message.job_name!r} ({message.message_id}) is unroutable: exchange "
                f"{exchange!r} has no queue bound for routing key {routing_key!r}"
            )

    async def publish_many(
        self,
        messages: Iterable[tuple[OutgoingMessage, str, str]],
        window: int,
        around: Around | None = None,
    ) -> list[tuple[OutgoingMessage, PublishError]]:
        """As ``Channel.publish_many``; each publish is confirmed at once, so ``window`` is moot."""
        failed: list[tuple[OutgoingMessage, PublishError]] = []
        for message, exchange, routing_key in messages:
            span = around(message, exchange, routing_key) if around else contextlib.nullcontext()
            try:
                with span:
                    await self.publish(message, exchange, routing_key)
            except PublishError as exc:
                failed.append((message, exc))
        return failed

    def deliver(self, queue: _Queue, stored: _Stored) -> Delivery:
        tag = next(self._tags)
        self.unacked[tag] = (queue, stored)
        return _delivery(stored, tag)

    async def ack(self, delivery_tag: int) -> None:
        self._settle(delivery_tag)

    async def nack(self, delivery_tag: int, *, requeue: bool) -> None:
        queue, stored = self._settle(delivery_tag)
        if requeue:
            stored.redelivered = True
            queue.push(stored)
        else:
            self._memory.dead_letter(queue, stored, "rejected")

    def _settle(self, delivery_tag: int) -> tuple[_Queue, _Stored]:
        try:
            return self.unacked.pop(delivery_tag)
        except KeyError:
            raise RuntimeError(
                f"unknown delivery tag {delivery_tag}: settled twice? (RabbitMQ would close the "
                "channel with PRECONDITION_FAILED)"
            ) from None
