"""One in-memory connection: its channels, its exclusive queues, and a way to lose it."""

from __future__ import annotations

import asyncio
import itertools

from brokerjobs.broker.memory.channel import MemoryChannel
from brokerjobs.broker.memory.core import Core
from brokerjobs.errors import ConnectionLost


class MemoryConnection:
    """A ``BrokerConnection`` on a ``MemoryBroker``; ``drop()`` plays a network failure."""

    def __init__(self, core: Core, role: str, server_version: tuple[int, ...]) -> None:
        self._core = core
        self.role = role
        self._version = server_version
        self._lost: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._numbers = itertools.count(1)
        self.channels: list[MemoryChannel] = []

    @property
    def lost(self) -> asyncio.Future[BaseException | None]:
        return self._lost

    @property
    def is_closed(self) -> bool:
        return self._lost.done()

    @property
    def server_version(self) -> tuple[int, ...]:
        return self._version

    def silent_for(self) -> float:
        return 0.0  # nothing between here and the broker can fall silent

    async def channel(self, *, confirms: bool = True, prefetch: int | None = None) -> MemoryChannel:
        if self.is_closed:
            raise ConnectionLost(f"opening a channel: the {self.role} connection is closed")
        channel = MemoryChannel(
            self._core, self, next(self._numbers), confirms=confirms, prefetch=prefetch
        )
        self.channels = [c for c in self.channels if not c.is_closed]
        self.channels.append(channel)
        return channel

    async def close(self) -> None:
        self._end(None)

    def drop(self, why: str = "the connection dropped") -> None:
        """Close as a network failure would: ``lost`` completes with ConnectionLost, unacked
        deliveries return to their queues as redelivered, exclusive queues go."""
        self._end(ConnectionLost(f"{self.role} connection to the memory broker lost: {why}"))

    def _end(self, reason: ConnectionLost | None) -> None:
        if self._lost.done():
            return
        for channel in self.channels:  # first: what they give back must not go to a sibling
            channel.detach_consumers()
        for channel in self.channels:
            channel.shut(reason or ConnectionLost(f"the {self.role} connection was closed"))
        self.channels.clear()
        self._core.remove_owned(self)
        self._lost.set_result(reason)
        self._core.dispatch()
