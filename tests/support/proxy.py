"""A TCP proxy in the test's event loop, to break connections to the broker on demand.

>>> async with TcpProxy("127.0.0.1", 5672) as proxy:
...     url = proxy.url()
...     ...
...     proxy.cut()      # abort every open connection, both sides, at once
...     proxy.pause()    # new connections are accepted and aborted at once
...     proxy.resume()
...     proxy.cut_on(CHANNEL_OPEN)  # abort the connection instead of forwarding the next
...                                 # channel.open a client sends: a loss in the middle of an RPC
...     proxy.swallow(BASIC_ACK, sender="server")  # drop the next confirm, keep the connection:
...                                                # a broker that never answers
...     proxy.block()    # what a broker resource alarm does: connection.blocked to the client,
...     proxy.unblock()  # the client's frames held back until connection.unblocked
...     proxy.blackhole()  # a partition: nothing passes either way, nothing is closed (no RST,
...     proxy.heal()       # no FIN); new connections are accepted and never answered

The proxy reads the AMQP 0-9-1 frames it forwards (type, channel, size, payload, frame-end) only to
recognise methods for ``cut_on``; it forwards every byte unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self
from urllib.parse import urlsplit, urlunsplit

Method = tuple[int, int]  # (class id, method id)
Sender = Literal["client", "server"]

# Methods of session set-up. The client sends:
CONNECTION_OPEN: Method = (10, 40)
CHANNEL_OPEN: Method = (20, 10)
CHANNEL_CLOSE: Method = (20, 40)
EXCHANGE_DECLARE: Method = (40, 10)
QUEUE_DECLARE: Method = (50, 10)
QUEUE_BIND: Method = (50, 20)
BASIC_QOS: Method = (60, 10)
BASIC_CONSUME: Method = (60, 20)
CONFIRM_SELECT: Method = (85, 10)
# The broker sends:
CONNECTION_OPEN_OK: Method = (10, 41)
CHANNEL_OPEN_OK: Method = (20, 11)
CHANNEL_CLOSE_OK: Method = (20, 41)
EXCHANGE_DECLARE_OK: Method = (40, 11)
QUEUE_DECLARE_OK: Method = (50, 11)
QUEUE_BIND_OK: Method = (50, 21)
BASIC_QOS_OK: Method = (60, 11)
BASIC_CONSUME_OK: Method = (60, 21)
CONFIRM_SELECT_OK: Method = (85, 11)
BASIC_ACK: Method = (60, 80)  # a publisher confirm (the client acks deliveries with it too)
CONNECTION_BLOCKED: Method = (10, 60)
CONNECTION_UNBLOCKED: Method = (10, 61)

_PROTOCOL_HEADER = 8  # b"AMQP\x00\x00\x09\x01", sent by the client before its first frame
_FRAME_HEADER = 7  # type (1), channel (2), payload size (4); then payload and frame-end (1)
_FRAME_METHOD = 1
_FRAME_HEARTBEAT = 8
_FRAME_END = b"\xce"


def method_frame(method: Method, arguments: bytes = b"", channel: int = 0) -> bytes:
    """One AMQP method frame, e.g. ``method_frame(CONNECTION_BLOCKED, shortstr("alarm"))``."""
    payload = method[0].to_bytes(2, "big") + method[1].to_bytes(2, "big") + arguments
    header = bytes([_FRAME_METHOD]) + channel.to_bytes(2, "big") + len(payload).to_bytes(4, "big")
    return header + payload + _FRAME_END


def shortstr(text: str) -> bytes:
    data = text.encode()
    return bytes([len(data)]) + data


@dataclass
class _Trigger:
    sender: Sender
    method: Method
    forward: bool
    times: int
    swallow: bool = False  # drop the frame and keep the connection open


class _Link:
    """One client connection and its upstream connection, pumped both ways."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.pumps: list[asyncio.Task[None]] = []
        self.held: list[bytes] | None = None  # the client's frames while blocked

    def abort(self) -> None:
        for pump in self.pumps:
            if pump is not asyncio.current_task():
                pump.cancel()
        self.client.transport.abort()
        self.upstream.transport.abort()


class TcpProxy:
    """Listens on ``127.0.0.1:<free port>`` and forwards each connection to ``host:port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.accepted = 0  # connections forwarded upstream
        self.refused = 0  # connections aborted because the proxy was paused
        self.cuts = 0  # connections aborted by cut() or a cut_on() trigger
        self.triggered: list[tuple[Sender, Method]] = []  # the cut_on() triggers that fired
        self._paused = False
        self._flowing = asyncio.Event()  # cleared while blackholed
        self._flowing.set()
        self._triggers: list[_Trigger] = []
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}{vhost}"

    def url_for(self, broker_url: str) -> str:
        """``broker_url`` (credentials, vhost, query) with its host and port replaced by ours."""
        parts = urlsplit(broker_url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for handler in list(self._handlers):
            handler.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

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

    def cut(self) -> int:
        """Abort every open connection on both sides (no AMQP close, no flush); returns how many."""
        links = list(self._links)
        for link in links:
            self._abort(link)
        return len(links)

    def cut_on(
        self, method: Method, *, sender: Sender = "client", forward: bool = False, times: int = 1
    ) -> None:
        """The next ``times`` times ``sender`` sends ``method``, abort that connection.

        With ``forward=False`` the frame is dropped: the client is left waiting for a reply, as
        when the network fails in the middle of an RPC. With ``forward=True`` the frame is passed
        on first, then the connection is aborted.
        """
        self._triggers.append(_Trigger(sender, method, forward, times))

    def swallow(self, method: Method, *, sender: Sender = "server", times: int = 1) -> None:
        """Drop the next ``times`` ``method`` frames ``sender`` sends; the connection stays up."""
        self._triggers.append(_Trigger(sender, method, forward=False, times=times, swallow=True))

    def block(self, reason: str = "memory alarm (test)") -> None:
        """Act as a broker under a resource alarm: send connection.blocked to every client and
        hold back what they send (nothing reaches the broker) until ``unblock()``."""
        for link in self._links:
            link.held = []
            link.client.write(method_frame(CONNECTION_BLOCKED, shortstr(reason)))

    def unblock(self) -> None:
        """Forward the held frames in order, then send connection.unblocked."""
        for link in self._links:
            for frame in link.held or ():
                link.upstream.write(frame)
            link.held = None
            link.client.write(method_frame(CONNECTION_UNBLOCKED))

    @property
    def armed(self) -> int:
        """How many cut_on() triggers have not fired yet."""
        return sum(t.times for t in self._triggers)

    def blackhole(self) -> None:
        """Act as a network partition: stop passing bytes both ways on every connection, open
        or new, without closing any. Frames (and a side's close) wait in the proxy and in the
        kernel's socket buffers, as TCP segments wait in retransmission, until ``heal()``."""
        self._flowing.clear()

    def heal(self) -> None:
        """End the partition: whatever waited is passed on, in order."""
        self._flowing.set()

    @property
    def blackholed(self) -> bool:
        return not self._flowing.is_set()

    def pause(self) -> None:
        """Abort new connections as soon as they are accepted, until ``resume()``."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def _abort(self, link: _Link) -> None:
        if link in self._links:
            self._links.discard(link)
            self.cuts += 1
        link.abort()

    def _trigger(self, sender: Sender, method: Method) -> _Trigger | None:
        for trigger in self._triggers:
            if trigger.sender == sender and trigger.method == method and trigger.times > 0:
                trigger.times -= 1
                self.triggered.append((sender, method))
                return trigger
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            # close(): swallowed, because asyncio logs a cancelled client_connected_cb task
            # as an error ("Exception in callback").
            writer.transport.abort()
        finally:
            self._handlers.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._paused:
            self.refused += 1
            writer.transport.abort()
            return
        await self._flowing.wait()  # partitioned: accepted, never answered
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        self.accepted += 1
        link.pumps = [
            asyncio.create_task(self._pump(reader, up_writer, link, "client")),
            asyncio.create_task(self._pump(up_reader, writer, link, "server")),
        ]
        try:
            # Either side closing ends the link: close the other side too.
            await asyncio.wait(link.pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if link in self._links:
                self._links.discard(link)
                for pump in link.pumps:
                    pump.cancel()
                await asyncio.gather(*link.pumps, return_exceptions=True)
                for side in (writer, up_writer):
                    side.close()
            else:
                await asyncio.gather(*link.pumps, return_exceptions=True)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        sender: Sender,
    ) -> None:
        """Forward one direction frame by frame, aborting the link when a trigger fires."""
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            if sender == "client":
                writer.write(await reader.readexactly(_PROTOCOL_HEADER))
            while True:
                header = await reader.readexactly(_FRAME_HEADER)
                size = int.from_bytes(header[3:7], "big")
                frame = header + await reader.readexactly(size + 1)
                await self._flowing.wait()
                trigger = None
                if header[0] == _FRAME_METHOD and size >= 4:
                    method = (int.from_bytes(frame[7:9], "big"), int.from_bytes(frame[9:11], "big"))
                    trigger = self._trigger(sender, method)
                if trigger is not None and trigger.swallow:
                    continue
                if trigger is not None and trigger.forward:
                    writer.write(frame)
                    with contextlib.suppress(ConnectionError, OSError):
                        await writer.drain()
                if trigger is not None:
                    self._abort(link)
                    return
                if sender == "client" and link.held is not None and header[0] != _FRAME_HEARTBEAT:
                    link.held.append(frame)  # a blocked broker does not read; heartbeats pass
                    continue
                writer.write(frame)
                await writer.drain()
        await self._flowing.wait()  # a side's close crosses a partition only when it heals
