"""One in-memory queue: ready messages in priority-then-arrival order, TTLs, its consumers."""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from brokerjobs.broker.base import DeliveryCallback
from brokerjobs.envelope import OutgoingMessage

# Arguments RabbitMQ compares when a queue is declared again (its `declare_args`); others are
# accepted whatever their value.
EQUIVALENCE_CHECKED = (
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
)
# ... and for quorum queues also these (3.10: a classic queue accepts any value of them).
QUORUM_EQUIVALENCE_CHECKED = ("x-delivery-limit", "x-dead-letter-strategy")
# RabbitMQ 4.x gives quorum queues this delivery limit when none is set.
QUORUM_DEFAULT_DELIVERY_LIMIT = 20


@dataclass(slots=True)
class Stored:
    message: OutgoingMessage  # this queue's own copy, as published or dead-lettered
    exchange: str
    routing_key: str
    seq: int
    enqueued_at: float  # virtual seconds
    redelivered: bool = False
    returns: int = 0  # times given back to the queue (a quorum queue's delivery count)


class Receiver(Protocol):
    """The channel side of a consumer: its prefetch and where deliveries go."""

    @property
    def prefetch(self) -> int | None: ...

    def deliver(self, consumer: Consumer, queue: MemoryQueue, stored: Stored) -> None: ...

    def cancelled_by_broker(self, consumer_tag: str) -> None: ...


@dataclass(eq=False, slots=True)
class Consumer:
    tag: str
    queue: str
    channel: Receiver
    callback: DeliveryCallback
    no_ack: bool
    unacked: int = 0
    held: bool = False  # deliveries wait for a driven dispatch (see MemoryBroker(hold_roles))

    def has_credit(self) -> bool:
        prefetch = self.channel.prefetch
        return self.no_ack or not prefetch or self.unacked < prefetch


class MemoryQueue:
    """Ready messages by priority where ``x-max-priority`` is set (classic queues), else FIFO."""

    def __init__(
        self,
        name: str,
        arguments: Mapping[str, Any],
        *,
        owner: object = None,
        version: tuple[int, ...] = (),
    ) -> None:
        self.name = name
        self.arguments = dict(arguments)
        self.owner = owner  # the connection owning an exclusive queue
        self.consumers: list[Consumer] = []
        self.deleted = False
        self.quorum = self.arguments.get("x-queue-type") == "quorum"
        self.single_active = bool(self.arguments.get("x-single-active-consumer"))
        self._max_priority = 0 if self.quorum else int(self.arguments.get("x-max-priority", 0))
        ttl = self.arguments.get("x-message-ttl")
        self._ttl_ms = int(ttl) if ttl is not None else None
        limit = self.arguments.get("x-delivery-limit")
        if limit is None and self.quorum and version >= (4,):
            limit = QUORUM_DEFAULT_DELIVERY_LIMIT
        self.delivery_limit = int(limit) if limit is not None and self.quorum else None
        self._heap: list[tuple[int, int, Stored]] = []
        self._turn = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, stored: Stored) -> None:
        # A requeued message keeps its sequence number: it goes back to its old place.
        priority = min(stored.message.priority or 0, self._max_priority)
        heapq.heappush(self._heap, (-priority, stored.seq, stored))

    def pop(self) -> Stored:
        return heapq.heappop(self._heap)[2]

    def ready(self) -> list[Stored]:
        return [entry[2] for entry in sorted(self._heap, key=lambda e: e[:2])]

    def purge(self) -> int:
        count = len(self._heap)
        self._heap.clear()
        return count

    def head_expires_at(self) -> float | None:
        """When the head expires: TTLs only fire at a queue's head, in RabbitMQ as here."""
        if not self._heap:
            return None
        head = self._heap[0][2]
        ttls = [ttl for ttl in (self._ttl_ms, head.message.expiration_ms) if ttl is not None]
        return round(head.enqueued_at + min(ttls) / 1000, 6) if ttls else None

    def next_consumer(self, *, driven: bool = True) -> Consumer | None:
        """Who gets the next message: round-robin among consumers with credit, or only the
        first (the active) one with ``x-single-active-consumer``; held consumers only when
        ``driven``."""
        if not self.consumers:
            return None
        if self.single_active:
            active = self.consumers[0]
            return active if active.has_credit() and (driven or not active.held) else None
        count = len(self.consumers)
        for step in range(count):
            consumer = self.consumers[(self._turn + step) % count]
            if consumer.has_credit() and (driven or not consumer.held):
                self._turn = (self._turn + step + 1) % count
                return consumer
        return None

    def remove_consumer(self, consumer: Consumer) -> None:
        if consumer in self.consumers:
            self.consumers.remove(consumer)

    def inequivalent(self, arguments: Mapping[str, Any]) -> str | None:
        """RabbitMQ's PRECONDITION_FAILED text if ``arguments`` differ from this queue's."""
        checked = EQUIVALENCE_CHECKED + (QUORUM_EQUIVALENCE_CHECKED if self.quorum else ())
        for key in checked:
            current, received = _normal(key, self.arguments), _normal(key, arguments)
            if current != received:
                return (
                    f"PRECONDITION_FAILED - inequivalent arg '{key}' for queue '{self.name}' in "
                    f"vhost '/': {_difference(received, current)}"
                )
        return None


def _normal(key: str, arguments: Mapping[str, Any]) -> Any:
    value = arguments.get(key)
    if key == "x-queue-type" and value is None:
        return "classic"
    return value


def _difference(received: Any, current: Any) -> str:
    """As RabbitMQ words it: "received '200' but current is '100'", or with "none"."""
    if received is not None and current is not None:
        return f"received '{received}' but current is '{current}'"
    shown = ["none" if v is None else f"the value '{v}'" for v in (received, current)]
    return f"received {shown[0]} but current is {shown[1]}"
