"""The in-memory broker's state: queues, exchanges, the virtual clock, and dispatch."""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from brokerjobs.broker.memory.deaths import dead_copy
from brokerjobs.broker.memory.queues import MemoryQueue, Stored
from brokerjobs.broker.memory.routing import Binding, Exchanges
from brokerjobs.broker.problems import mismatch_message, missing_message
from brokerjobs.envelope import OutgoingMessage
from brokerjobs.errors import TopologyError, TopologyMismatch

log = logging.getLogger("brokerjobs.broker.memory")


@dataclass(slots=True)
class VirtualClock:
    """Virtual seconds since the broker started; only ``MemoryBroker.advance`` moves it."""

    now: float = 0.0

    def time(self) -> float:
        return self.now


class Core:
    """Everything the broker holds, shared by all its connections and channels."""

    def __init__(self, clock: VirtualClock, version: tuple[int, ...]) -> None:
        self.held_roles: frozenset[str] = frozenset()
        self.clock = clock
        self.version = version
        self.queues: dict[str, MemoryQueue] = {}
        self.exchanges = Exchanges()
        self._seq = itertools.count()
        self._private = itertools.count(1)
        self.tasks: set[asyncio.Task[None]] = set()  # delivery callbacks still running
        self.deliveries = 0  # every delivery to a consumer so far
        self.errors: list[BaseException] = []  # exceptions raised by delivery callbacks
        self.channel_failures: list[str] = []  # why the broker closed a channel

    # -- topology ----------------------------------------------------------------------------

    def declare_queue(
        self, name: str, arguments: Mapping[str, Any], owner: object = None
    ) -> MemoryQueue:
        existing = self.queues.get(name)
        if existing is not None:
            self.check_access(existing, owner)
            problem = existing.inequivalent(arguments)
            if problem is not None:
                raise TopologyMismatch(mismatch_message("queue", name, problem))
            return existing
        if name.startswith("amq.") and owner is None:
            raise TopologyError(f"access refused for queue {name!r}: 'amq.*' names are reserved")
        queue = MemoryQueue(name, arguments, owner=owner, version=self.version)
        self.queues[name] = queue
        return queue

    def queue(self, name: str, accessor: object) -> MemoryQueue:
        """An existing queue ``accessor`` (a connection) may use; TopologyError if not."""
        queue = self.queues.get(name)
        if queue is None:
            raise TopologyError(missing_message("queue", name))
        self.check_access(queue, accessor)
        return queue

    def check_access(self, queue: MemoryQueue, accessor: object) -> None:
        if queue.owner is not None and queue.owner is not accessor:
            raise TopologyError(
                f"queue {queue.name!r} is exclusive to another connection (RESOURCE_LOCKED)"
            )

    def bind(self, queue: str, exchange: str, pattern: str, accessor: object) -> None:
        self.queue(queue, accessor)
        self.exchanges.bind(Binding(exchange, queue, pattern))

    def bind_exchange(self, destination: str, source: str, pattern: str) -> None:
        self.exchanges.require(destination)
        self.exchanges.bind(Binding(source, destination, pattern, to_exchange=True))

    def delete_queue(self, name: str, accessor: object, if_empty: bool, if_unused: bool) -> None:
        queue = self.queues.get(name)
        if queue is None:
            return  # as RabbitMQ: deleting a missing queue succeeds
        self.check_access(queue, accessor)
        if if_unused and queue.consumers:
            raise TopologyError(
                f"queue {name!r} in use ({len(queue.consumers)} consumer(s)): not deleted "
                "(PRECONDITION_FAILED, if_unused)"
            )
        if if_empty and len(queue):
            raise TopologyError(
                f"queue {name!r} not empty ({len(queue)} message(s)): not deleted "
                "(PRECONDITION_FAILED, if_empty)"
            )
        self.remove_queue(queue)

    def remove_queue(self, queue: MemoryQueue) -> None:
        """Drop ``queue``, its messages and bindings; its consumers are cancelled."""
        del self.queues[queue.name]
        queue.deleted = True
        queue.purge()
        self.exchanges.unbind_queue(queue.name)
        for consumer in list(queue.consumers):
            queue.remove_consumer(consumer)
            consumer.channel.cancelled_by_broker(consumer.tag)

    def private_name(self) -> str:
        return f"amq.gen-{next(self._private):06d}"

    def remove_owned(self, owner: object) -> None:
        for queue in [q for q in self.queues.values() if q.owner is owner]:
            self.remove_queue(queue)

    # -- messages ----------------------------------------------------------------------------

    def enqueue(self, message: OutgoingMessage, exchange: str, routing_key: str) -> int:
        """Route a copy of ``message`` to each matching queue; how many got one."""
        names = self.exchanges.route(exchange, routing_key)
        queues = [self.queues[name] for name in names if name in self.queues]
        for queue in queues:
            own = replace(message, headers=copy.deepcopy(message.headers))
            seq = next(self._seq)
            queue.push(Stored(own, exchange, routing_key, seq, self.clock.now))
        return len(queues)

    def give_back(self, queue: MemoryQueue, stored: Stored) -> None:
        """A delivery returns unsettled (nack with requeue, a channel closed): redelivered."""
        if queue.deleted:
            return
        stored.redelivered = True
        stored.returns += 1
        limit = queue.delivery_limit
        if limit is not None and stored.returns > limit:
            self.dead_letter(queue, stored, "delivery_limit")
        else:
            queue.push(stored)

    def dead_letter(self, queue: MemoryQueue, stored: Stored, reason: str) -> None:
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if exchange is None:
            return  # no dead-letter exchange: the broker discards it
        routing_key = queue.arguments.get("x-dead-letter-routing-key", stored.routing_key)
        dead = dead_copy(stored, queue.name, reason, self.version)
        try:
            routed = self.enqueue(dead, exchange, routing_key)
        except TopologyError:
            routed = 0
        if not routed:
            log.warning("dead letter from %s dropped: nothing bound for it", queue.name)

    def expire(self) -> None:
        """Dead-letter every head whose TTL has passed, earliest first."""
        while (found := self._first_expired()) is not None:
            self.dead_letter(found, found.pop(), "expired")

    def _first_expired(self) -> MemoryQueue | None:
        due = [
            (at, q.name) for q in self.queues.values() if (at := q.head_expires_at()) is not None
        ]
        due = [entry for entry in due if entry[0] <= self.clock.now]
        return self.queues[min(due)[1]] if due else None

    def next_expiry(self) -> float | None:
        times = (queue.head_expires_at() for queue in self.queues.values())
        return min((at for at in times if at is not None), default=None)

    def dispatch(self, *, driven: bool = False) -> int:
        """Hand every deliverable message to a consumer with credit; how many were handed.

        Consumers of connections in ``held_roles`` get messages only from a ``driven`` dispatch
        (``run_until_idle``, ``advance``): their deliveries happen when a test says so."""
        self.expire()
        handed = 0
        for queue in list(self.queues.values()):
            while len(queue) and (consumer := queue.next_consumer(driven=driven)) is not None:
                consumer.channel.deliver(consumer, queue, queue.pop())
                handed += 1
        self.deliveries += handed
        return handed

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # As aiormq: a failed callback is logged; the delivery stays unsettled.
            log.error("Consumer callback failed", exc_info=error)
            self.errors.append(error)
