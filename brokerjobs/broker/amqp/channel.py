"""One AMQP channel: pipelined publishing with confirms, consuming, coalesced acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, cast

import aio_pika
import aiormq
import aiormq.exceptions as amqp_errors
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from brokerjobs.ack_batching import AckBatcher
from brokerjobs.broker.amqp.declaring import Declaring
from brokerjobs.broker.amqp.errors import CONNECTION_ERRORS, link_failures
from brokerjobs.broker.amqp.properties import check_confirmation, properties, to_delivery
from brokerjobs.broker.amqp.properties import tag as delivery_tag_of
from brokerjobs.broker.base import Around, DeliveryCallback
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.errors import (
    ConnectionLost,
    PublishError,
    PublishInterrupted,
    PublishNacked,
    TopologyError,
)

log = logging.getLogger("brokerjobs.transport")

CLOSE_TIMEOUT_S = 5.0
# Acks are coalesced into one basic.ack(multiple) per this delay or this many acks: one frame and
# one send instead of one per job. A crash before a flush only redelivers (bounded by prefetch).
ACK_DELAY_S = 0.001
ACK_BATCH = 64
STALL_GRACE_S = 0.5
_background: set[asyncio.Future[None]] = set()  # strong references to fire-and-forget closes


class Channel(Declaring):
    """One AMQP channel with confirms; all operations the rest of brokerjobs needs."""

    def __init__(
        self,
        raw: aio_pika.abc.AbstractChannel,
        underlay: aiormq.abc.AbstractChannel,
        *,
        confirm_timeout: float,
    ) -> None:
        self._raw = raw
        self._ch = cast(aiormq.Channel, underlay)
        self._confirm_timeout = confirm_timeout
        self._progress_at = 0.0  # loop time of the last settled publish (or the first pending)
        self._watchdog: asyncio.Future[None] | None = None
        self._scopes: set[asyncio.Timeout] = set()  # one per publish waiting for its confirm
        self.broken = False  # confirms stopped coming: nothing more may be trusted to this channel
        self._acks = AckBatcher()
        self._settling = asyncio.Lock()  # orders ack/nack frames: see _send_acks
        self._ack_timer: asyncio.TimerHandle | None = None
        self.consumer_cancelled: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)

    def _on_broker_cancel(self, frame: spec.Basic.Cancel) -> None:
        if not self.consumer_cancelled.done():
            self.consumer_cancelled.set_result(str(frame.consumer_tag))

    @property
    def closing(self) -> asyncio.Future[Any]:
        return self._ch.closing

    @property
    def is_closed(self) -> bool:
        return self.broken or bool(self._ch.is_closed)

    async def close(self) -> None:
        with contextlib.suppress(ConnectionLost, *CONNECTION_ERRORS):
            await self.flush_acks()
            await asyncio.wait_for(self._raw.close(), CLOSE_TIMEOUT_S)
        self.abandon_waiting()

    @property
    def unconfirmed(self) -> int:
        """Publishes waiting for their confirm."""
        return len(self._scopes)

    def abandon_waiting(self) -> None:
        """End every publish still waiting on this (closed) channel with PublishInterrupted.

        aiormq fails pending confirms when a channel closes, but not a publish stuck behind a
        dead connection's full write queue: that one would wait forever.
        """
        now = asyncio.get_running_loop().time()
        for scope in list(self._scopes):
            if not scope.expired():  # an expiring one would raise RuntimeError
                scope.reschedule(now)

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        """Publish with ``mandatory`` and wait for the broker's confirm."""
        confirmation = await self._send(message, exchange, routing_key)
        check_confirmation(confirmation, message, exchange, routing_key)

    async def publish_many(
        self,
        messages: Iterable[tuple[OutgoingMessage, str, str]],
        window: int,
        around: Around | None = None,
    ) -> list[tuple[OutgoingMessage, PublishError]]:
        """Publish pipelined, at most ``window`` unconfirmed at once.

        ``around(message, exchange, routing_key)`` wraps each publish (e.g. a tracing span).
        Returns the messages that were not confirmed, each with its error; all others are.
        """
        slots = asyncio.Semaphore(window)
        failed: list[tuple[OutgoingMessage, PublishError]] = []
        tasks: set[asyncio.Future[None]] = set()

        async def one(message: OutgoingMessage, exchange: str, routing_key: str) -> None:
            try:
                if around is None:
                    confirmation = await self._send(message, exchange, routing_key)
                    check_confirmation(confirmation, message, exchange, routing_key)
                else:
                    with around(message, exchange, routing_key):
                        await self.publish(message, exchange, routing_key)
            except PublishError as exc:
                failed.append((message, exc))
            finally:
                slots.release()

        for message, exchange, routing_key in messages:
            await slots.acquire()  # a constant-cost window: no walk over pending futures
            task = asyncio.ensure_future(one(message, exchange, routing_key))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        return failed

    async def _send(self, message: OutgoingMessage, exchange: str, routing_key: str) -> Any:
        if self.broken:  # given up: nothing sent on it could be trusted, nor watched
            raise self._interrupted(message)
        loop = asyncio.get_running_loop()
        if not self._scopes:
            self._progress_at = loop.time()
        # No deadline of its own: the watchdog expires every open scope when it gives up.
        scope = asyncio.timeout(None)
        self._scopes.add(scope)
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch_confirms())
        try:
            return await self._publish_within(scope, message, exchange, routing_key)
        finally:
            self._scopes.discard(scope)
            self._progress_at = loop.time()

    async def _publish_within(
        self, scope: asyncio.Timeout, message: OutgoingMessage, exchange: str, routing_key: str
    ) -> Any:
        """aiormq's publish and confirm; every way it can fail mapped to our errors."""
        try:
            async with scope:
                return await self._ch.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties(message),
                    mandatory=True,
                    wait=False,
                )
        except amqp_errors.ChannelNotFoundEntity as exc:  # before CONNECTION_ERRORS: it is one
            raise TopologyError(
                f"cannot publish job {message.message_id}: exchange {exchange!r} does not exist "
                f"(broker: {exc}). Declare the consumer's topology first (`brokerjobs topology "
                "declare MODULE:APP`) or check the publisher's exchange name."
            ) from None
        except amqp_errors.DeliveryError as exc:
            raise PublishNacked(
                f"the broker nacked job {message.message_id} to {exchange!r}/{routing_key!r}: "
                f"{exc}; it is not stored, publish it again"
            ) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._ch.is_closed or (task is not None and task.cancelling()):
                raise  # our caller was cancelled: not ours to turn into an error
            raise self._interrupted(message) from None
        except TimeoutError:  # the watchdog gave up (before CONNECTION_ERRORS: an OSError)
            raise self._interrupted(message) from None
        except CONNECTION_ERRORS:
            raise self._interrupted(message) from None
        except Exception:
            # aiormq fails pending publishes with the close reason, a bare Exception() when its
            # writer died: any error once the channel or connection is closed is an interruption.
            if self._ch.is_closed or self._ch.connection.is_closed:
                raise self._interrupted(message) from None
            raise

    async def _watch_confirms(self) -> None:
        """Drop the channel when publishes stop making progress: some are waiting and none was
        settled for ``confirm_timeout``, unless the broker is blocking a live connection (a
        resource alarm, when waiting is right). Covers a wedged queue or broker bug that never
        confirms, and aiormq publishes stuck behind a dead connection's full write queue.

        Measured as progress of the channel, not per message, so a long batch is never cut.
        """
        loop = asyncio.get_running_loop()
        was_blocked = False
        try:
            while self._scopes and not self.broken:
                idle = loop.time() - self._progress_at
                if idle < self._confirm_timeout:
                    await asyncio.sleep(self._confirm_timeout - idle)
                    continue
                blocked = await self._blocked()
                if blocked or was_blocked:  # blocked, or unblocked since: a full timeout again
                    self._progress_at = loop.time()
                else:
                    # After a stalled event loop, confirms may be waiting unread in the socket:
                    # let the reader run before judging.
                    await asyncio.sleep(min(STALL_GRACE_S, self._confirm_timeout / 10))
                    idle = loop.time() - self._progress_at
                    if self._scopes and not self.broken and idle >= self._confirm_timeout:
                        self._give_up(f"no publisher confirm for {idle:.1f}s")
                was_blocked = blocked
        finally:
            self._watchdog = None

    async def _blocked(self) -> bool:
        """Whether the broker holds this live connection blocked (connection.blocked): aiormq's
        ``ready()`` then waits, and a zero timeout fires only if it would wait."""
        if self._ch.is_closed or self._ch.connection.is_closed:
            return False
        try:
            async with asyncio.timeout(0):
                await self._ch.connection.ready()
        except TimeoutError:
            return True
        return False

    def _give_up(self, why: str) -> None:
        """Stop trusting this channel: end its waiting publishes with PublishInterrupted (they
        are published again, with the same ids) and close it; callers then open a new one."""
        if self.broken:
            return
        self.broken = True
        log.warning("dropping AMQP channel %s: %s", self._ch.number, why)
        self.abandon_waiting()
        close = asyncio.ensure_future(self.close())
        _background.add(close)
        close.add_done_callback(_background.discard)

    def _interrupted(self, message: OutgoingMessage) -> PublishInterrupted:
        cause = (
            f"the broker sent no confirm for {self._confirm_timeout:g}s "
            "(BROKERJOBS_CONFIRM_TIMEOUT)"
            if self.broken
            else "the connection was lost"
        )
        return PublishInterrupted(
            f"{cause} before job {message.message_id} was confirmed; "
            "it may or may not be stored, publish it again"
        )

    # -- consuming and settling --------------------------------------------------------------

    async def consume(self, queue: str, callback: DeliveryCallback, *, no_ack: bool = False) -> str:
        channel = self._ch

        async def on_message(message: DeliveredMessage) -> None:
            self._acks.delivered(delivery_tag_of(message))  # first: see ack_batching
            await callback(to_delivery(message))

        with link_failures(f"consuming {queue!r}", lambda: self.is_closed):
            try:
                ok = await channel.basic_consume(queue, on_message, no_ack=no_ack)
            except amqp_errors.ChannelNotFoundEntity:
                raise TopologyError(
                    f"queue {queue!r} does not exist: run `brokerjobs topology declare MODULE:APP`"
                ) from None
            except (amqp_errors.ChannelAccessRefused, amqp_errors.ChannelLockedResource) as exc:
                raise TopologyError(f"cannot consume queue {queue!r}: {exc}") from None
        return str(ok.consumer_tag)

    async def cancel(self, consumer_tag: str) -> None:
        await self.flush_acks()
        with link_failures("cancelling a consumer", lambda: self.is_closed):
            await self._ch.basic_cancel(consumer_tag)

    async def ack(self, delivery_tag: int) -> None:
        """Ack soon (coalesced, within ``ACK_DELAY_S``); raises at once if the channel is gone."""
        if self._ch.is_closed:
            raise ConnectionLost(f"cannot ack: channel {self._ch.number} is closed")
        self._acks.acked(delivery_tag)
        if self._acks.pending >= ACK_BATCH:
            await self.flush_acks()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._flush_later)

    async def nack(self, delivery_tag: int, *, requeue: bool) -> None:
        async with self._settling:
            with link_failures("nack", lambda: self.is_closed):
                await self._send_acks()
                self._acks.settled_otherwise(delivery_tag)
                await self._ch.basic_nack(delivery_tag, requeue=requeue, wait=False)

    async def flush_acks(self) -> None:
        """Send every ack still waiting (before a cancel, a close, or a drain ends)."""
        async with self._settling:
            with link_failures("ack", lambda: self.is_closed):
                await self._send_acks()

    async def _send_acks(self) -> None:
        # Under self._settling: frames computed by one take() must reach the broker before
        # those of the next, or a multiple ack could overtake a single ack it covers (and the
        # broker closes the channel: "unknown delivery tag").
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        for tag, multiple in self._acks.take():
            await self._ch.basic_ack(tag, multiple=multiple, wait=False)

    def _flush_later(self) -> None:
        self._ack_timer = None
        flush = asyncio.ensure_future(self._flush_quietly())
        _background.add(flush)
        flush.add_done_callback(_background.discard)

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(ConnectionLost):  # channel gone: the broker requeues them
            await self.flush_acks()

    async def get(self, queue: str) -> Delivery | None:
        """``basic.get`` one message (manual ack), or None when the queue is empty."""
        with link_failures(f"reading {queue!r}", lambda: self.is_closed):
            try:
                message = await self._ch.basic_get(queue, no_ack=False)
            except amqp_errors.ChannelNotFoundEntity:
                raise TopologyError(
                    f"queue {queue!r} does not exist: run `brokerjobs topology declare MODULE:APP`"
                ) from None
        if isinstance(message.delivery, spec.Basic.GetEmpty):
            return None
        self._acks.delivered(delivery_tag_of(message))
        return to_delivery(message)
