"""Pipelined publishing on one aiormq channel: the frames of every publish submitted in one
event-loop turn reach the connection's writer as one write.

aiormq's ``basic_publish`` spends about 40 us of CPU per message on the way to the socket
(pamqp marshalling the same method frame field by field, a lock and two context managers, a
write-queue item and a ``socket.send`` per message). Here the method frame is cached per
exchange and routing key and a turn's publishes are joined into one write. Delivery tags,
confirmation futures and the message-id map for returns stay aiormq's own, so its reader
settles these publishes exactly as its own: acks, nacks, returns, and rejecting every future
when the channel closes. Delivery tags are counted when the frames are queued, in the order
they are written; so no other code may publish on a channel that has an outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import aiormq
import aiormq.exceptions
from aiormq.abc import ChannelFrame
from aiormq.channel import Returning

from brokerjobs.errors import UnencodableMessage

_FRAME = struct.Struct(">BHI")  # frame type, channel, payload size
_HEADER = struct.Struct(">BHIHHQ")  # the same, then class id, weight, body size
_END = b"\xce"
_PUBLISH = struct.pack(">HHH", 60, 40, 0)  # basic.publish, reserved ticket
_MANDATORY = b"\x01"
_METHOD_CACHE_LIMIT = 256
# What the outbox reads and writes of aiormq's channel (7.x); without any of it, channels use
# aiormq's basic_publish.
_NEEDED = (
    "delivery_tag", "confirmations", "message_id_delivery_tag", "write_queue",
    "closing", "max_content_size", "number", "publisher_confirms",
)  # fmt: skip


def supported(channel: aiormq.abc.AbstractChannel) -> bool:
    """Whether this aiormq channel has what the outbox uses, and confirms on."""
    names_present = all(hasattr(channel, name) for name in _NEEDED)
    return names_present and bool(getattr(channel, "publisher_confirms", False))


def _short_string(value: str, what: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise UnencodableMessage(
            f"the {what} {value[:40]!r}... is {len(raw)} bytes; AMQP allows 255"
        )
    return bytes((len(raw),)) + raw


class _Entry:
    """One queued publish: its frames until written, then its delivery tag; settles itself
    when its future completes (one callback per message, not aiormq's three)."""

    __slots__ = ("frames", "future", "ids", "message_id", "on_settled", "tag")

    def __init__(
        self,
        frames: bytes,
        message_id: str,
        future: asyncio.Future[Any],
        ids: dict[str, int],
        on_settled: Callable[[], None] | None,
    ) -> None:
        self.frames = frames
        self.message_id = message_id
        self.ids = ids
        self.on_settled = on_settled
        self.tag = 0  # 0: not written
        self.future = future
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[Any]) -> None:
        if self.tag and self.ids.get(self.message_id) == self.tag:
            del self.ids[self.message_id]  # as aiormq forgets ids for returns
        if not future.cancelled():
            future.exception()  # retrieved: a caller that gave up leaves no "never retrieved"
        if self.on_settled is not None:
            self.on_settled()


class Outbox:
    """Queues mandatory publishes of one confirm channel; each gets a future that aiormq's
    reader settles (an ack, the returned message, a nack's DeliveryError) and that the outbox
    fails with the channel's close reason when the channel closes."""

    __slots__ = ("_backlog", "_ch", "_drainer", "_loop", "_methods", "_pending", "_watch")

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._ch: Any = channel
        self._loop = asyncio.get_running_loop()
        self._pending: list[_Entry] = []
        self._methods: dict[tuple[str, str], bytes] = {}
        self._backlog: deque[ChannelFrame] = deque()  # waiting for room in the write queue
        self._drainer: asyncio.Future[None] | None = None
        self._watch: asyncio.Future[Any] = channel.closing
        self._watch.add_done_callback(self._closed)

    def submit(
        self,
        body: bytes,
        exchange: str,
        routing_key: str,
        properties: bytes,
        message_id: str,
        on_settled: Callable[[], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one publish; ``on_settled`` runs when its future completes, however.

        Raises UnencodableMessage for an exchange or routing key over 255 bytes.
        """
        method = self._methods.get((exchange, routing_key))
        if method is None:
            method = self._method_frame(exchange, routing_key)
        number = self._ch.number
        size = len(body)
        frames = [method, _HEADER.pack(2, number, 12 + len(properties), 60, 0, size), properties]
        limit = self._ch.max_content_size
        for start in range(0, size, limit):
            chunk = body[start : start + limit] if size > limit else body
            frames += (_END, _FRAME.pack(3, number, len(chunk)), chunk)
        frames.append(_END)
        ids = self._ch.message_id_delivery_tag
        future = self._loop.create_future()
        entry = _Entry(b"".join(frames), message_id, future, ids, on_settled)
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(entry)
        return entry.future

    def _method_frame(self, exchange: str, routing_key: str) -> bytes:
        payload = b"".join(
            (
                _PUBLISH,
                _short_string(exchange, "exchange name"),
                _short_string(routing_key, "routing key"),
                _MANDATORY,
            )
        )
        frame = _FRAME.pack(1, self._ch.number, len(payload)) + payload + _END
        if len(self._methods) >= _METHOD_CACHE_LIMIT:
            self._methods.clear()
        self._methods[exchange, routing_key] = frame
        return frame

    def _flush(self) -> None:
        if _refusing(self._ch):
            return  # _closed fails what is pending
        pending, self._pending = self._pending, []
        confirmations = self._ch.confirmations
        ids = self._ch.message_id_delivery_tag
        tag = self._ch.delivery_tag
        parts = []
        for entry in pending:
            if entry.future.done():  # its caller gave up before it was sent
                continue
            tag += 1
            entry.tag = tag
            confirmations[tag] = entry.future
            ids[entry.message_id] = tag
            parts.append(entry.frames)
            entry.frames = b""
        self._ch.delivery_tag = tag
        if parts:
            self._write(ChannelFrame(payload=b"".join(parts), should_close=False))

    def _closed(self, closing: asyncio.Future[Any]) -> None:
        """Fail every unsettled publish with the channel's close reason, as aiormq fails its
        own futures (a ConnectionError subclass for a lost connection, the broker's channel
        error for a refused publish)."""
        reason: BaseException | None = None
        if not closing.cancelled():
            reason = closing.exception()
        if reason is None or isinstance(reason, asyncio.CancelledError):
            reason = aiormq.exceptions.ChannelInvalidStateError("the channel closed")
        pending, self._pending = self._pending, []
        waiting = [entry.future for entry in pending]
        waiting += self._ch.confirmations.values()
        for future in waiting:
            if not future.done() and not isinstance(future, Returning):
                future.set_exception(reason)

    def _write(self, frame: ChannelFrame) -> None:
        if not self._backlog:
            try:
                self._ch.write_queue.put_nowait(frame)
                return
            except asyncio.QueueFull:
                pass
        self._backlog.append(frame)  # behind the earlier ones: frames keep their order
        if self._drainer is None:
            self._drainer = asyncio.ensure_future(self._drain_backlog())

    async def _drain_backlog(self) -> None:
        closing = self._ch.closing
        try:
            while self._backlog and not _refusing(self._ch):
                put = asyncio.ensure_future(self._ch.write_queue.put(self._backlog[0]))
                await asyncio.wait((put, closing), return_when=asyncio.FIRST_COMPLETED)
                if not put.done():
                    put.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await put
                    break  # the channel closed: aiormq rejected the futures
                self._backlog.popleft()
        finally:
            self._drainer = None
            if closing.done():
                self._backlog.clear()


def _refusing(channel: Any) -> bool:
    """Closed, or closing: aiormq queues its close-ok as soon as the broker's Channel.Close
    arrives but marks the channel closed only later, and a frame written after that close-ok
    makes RabbitMQ 4 close the whole connection (504 "expected 'channel.open'")."""
    return bool(channel.is_closed or channel._close_exception is not None)


class Window:
    """Counts the unsettled publishes of one batch (``opened``, then ``settled`` as each
    one's ``on_settled``); waits for room below ``size``."""

    __slots__ = ("_limit", "_on_settled", "_waiter", "open", "size")

    def __init__(self, size: int, on_settled: Callable[[], None]) -> None:
        self.size = max(size, 1)
        self.open = 0
        self._on_settled = on_settled
        self._limit = 0
        self._waiter: asyncio.Future[None] | None = None

    @property
    def full(self) -> bool:
        return self.open >= self.size

    def opened(self) -> None:
        self.open += 1

    def settled(self) -> None:
        self.open -= 1
        self._on_settled()
        waiter = self._waiter
        if waiter is not None and self.open <= self._limit and not waiter.done():
            waiter.set_result(None)

    async def room(self) -> None:
        await self._until(self.size - 1)

    async def empty(self) -> None:
        await self._until(0)

    async def _until(self, limit: int) -> None:
        self._limit = limit
        while self.open > limit:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._waiter = None
