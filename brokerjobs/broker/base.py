"""The broker seam: what brokerjobs needs of a message broker, as typed Protocols.

Two implementations fill it: ``brokerjobs.broker.amqp`` (RabbitMQ over aio-pika/aiormq, the only
code that imports them) and ``brokerjobs.broker.memory`` (in-process, with a virtual clock, for
tests). Everything above the seam (worker, publisher, parking lot, scheduler, status tracker)
types against these Protocols and raises or catches only ``brokerjobs.errors``:

- ``ConnectionLost``: the connection or channel under an operation failed (retry it later);
- ``PublishError`` and its subclasses: a publish was not confirmed;
- ``TopologyError``/``TopologyMismatch``: a queue or exchange is missing, refused or differs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.errors import PublishError

DeliveryCallback = Callable[[Delivery], Awaitable[None]]
# Wraps one publish of a pipelined batch (say, a tracing span): around(message, exchange, key).
Around = Callable[[OutgoingMessage, str, str], "AbstractContextManager[Any]"]


@dataclass(frozen=True, slots=True)
class QueueState:
    name: str
    messages: int
    consumers: int


class MessageChannel(Protocol):
    """What publishing and settling need of a channel."""

    async def publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        """Publish (mandatory, persistent as the message says) and wait for the confirm."""

    async def publish_many(
        self,
        messages: Iterable[tuple[OutgoingMessage, str, str]],
        window: int,
        around: Around | None = None,
    ) -> list[tuple[OutgoingMessage, PublishError]]:
        """Publish pipelined, at most ``window`` unconfirmed; returns the failed ones."""

    async def ack(self, delivery_tag: int) -> None: ...

    async def nack(self, delivery_tag: int, *, requeue: bool) -> None: ...


class BrokerChannel(MessageChannel, Protocol):
    """One channel: publishing with confirms, consuming with manual acks, topology."""

    @property
    def closing(self) -> asyncio.Future[Any]:
        """Completes when the channel closes for any reason."""

    @property
    def consumer_cancelled(self) -> asyncio.Future[str]:
        """Completes (with the consumer tag) when the broker cancels a consumer."""

    @property
    def is_closed(self) -> bool: ...

    @property
    def unconfirmed(self) -> int:
        """Publishes still waiting for their confirm."""

    async def close(self) -> None:
        """Flush pending acks and close (never raises for a channel already gone)."""

    async def consume(self, queue: str, callback: DeliveryCallback, *, no_ack: bool = False) -> str:
        """Start a consumer (manual acks unless ``no_ack``); each delivery runs ``callback``
        in its own task."""

    async def cancel(self, consumer_tag: str) -> None: ...

    async def flush_acks(self) -> None:
        """Send every ack still waiting (acks may be coalesced)."""

    async def get(self, queue: str) -> Delivery | None:
        """One message with manual ack, or None when the queue is empty."""

    async def declare_exchange(self, name: str, kind: str) -> None: ...

    async def declare_queue(self, name: str, arguments: Mapping[str, Any]) -> QueueState: ...

    async def declare_private_queue(self) -> str:
        """A server-named, exclusive queue that disappears with the connection."""

    async def bind(self, queue: str, exchange: str, pattern: str) -> None: ...

    async def bind_exchange(self, destination: str, source: str, pattern: str) -> None: ...

    async def inspect_queue(self, name: str) -> QueueState:
        """Depth and consumers of an existing queue; TopologyError if it does not exist."""

    async def delete_queue(
        self, name: str, *, if_empty: bool = False, if_unused: bool = False
    ) -> None: ...

    async def delete_exchange(self, name: str) -> None: ...


class BrokerConnection(Protocol):
    """One connection; ``lost`` completes when it closes for any reason."""

    @property
    def lost(self) -> asyncio.Future[BaseException | None]: ...

    @property
    def is_closed(self) -> bool: ...

    @property
    def server_version(self) -> tuple[int, ...]:
        """The broker's version, e.g. (3, 10, 8); () if unknown."""

    def silent_for(self) -> float:
        """Seconds since the broker last sent anything (0.0 if unknown)."""

    async def channel(
        self, *, confirms: bool = True, prefetch: int | None = None
    ) -> BrokerChannel: ...

    async def close(self) -> None:
        """Close, bounded in time; never raises for a connection already gone."""


class Broker(Protocol):
    """Opens connections: one per worker session, publisher, parking lot or tracker."""

    async def connect(self, role: str) -> BrokerConnection:
        """Connect (``role`` names the connection for operators); BrokerUnreachable if not."""
