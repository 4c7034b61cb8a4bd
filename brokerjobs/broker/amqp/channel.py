"""One AMQP channel: pipelined publishing with confirms, consuming, coalesced acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

import aio_pika
import aiormq
import aiormq.exceptions as amqp_errors
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from brokerjobs.ack_batching import AckBatcher
from brokerjobs.broker.amqp.declaring import Declaring
from brokerjobs.broker.amqp.errors import CONNECTION_ERRORS, link_failures
from brokerjobs.broker.amqp.properties import tag as delivery_tag_of
from brokerjobs.broker.amqp.properties import to_delivery
from brokerjobs.broker.amqp.publishing import Publishing
from brokerjobs.broker.base import DeliveryCallback
from brokerjobs.envelope import Delivery
from brokerjobs.errors import ConnectionLost, TopologyError

log = logging.getLogger("brokerjobs.transport")

CLOSE_TIMEOUT_S = 5.0
# Acks are coalesced into one basic.ack(multiple) per this delay or this many acks: one frame and
# one send instead of one per job. A crash before a flush only redelivers (bounded by prefetch).
ACK_DELAY_S = 0.001
ACK_BATCH = 64
_background: set[asyncio.Future[None]] = set()  # strong references to fire-and-forget flushes


class Channel(Declaring, Publishing):
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
        self._init_publishing(confirm_timeout)
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
