"""One AMQP connection and the channels it opened."""

from __future__ import annotations

import asyncio
import contextlib

import aio_pika

from brokerjobs.broker.amqp.channel import Channel
from brokerjobs.broker.amqp.errors import CONNECTION_ERRORS, link_failures

CLOSE_TIMEOUT_S = 5.0


class Connection:
    """One AMQP connection; ``lost`` completes when it closes for any reason."""

    def __init__(self, raw: aio_pika.abc.AbstractConnection, *, confirm_timeout: float) -> None:
        self._raw = raw
        self._confirm_timeout = confirm_timeout
        self._channels: list[Channel] = []  # strong references: aio-pika keeps only weak ones
        self._lost: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )
        raw.close_callbacks.add(self._on_close)

    def _on_close(self, _: object, exc: BaseException | None = None) -> None:
        if not self._lost.done():
            self._lost.set_result(exc)

    @property
    def lost(self) -> asyncio.Future[BaseException | None]:
        return self._lost

    @property
    def is_closed(self) -> bool:
        return self._lost.done() or self._raw.is_closed

    def silent_for(self) -> float:
        """Seconds since the last frame of any kind (heartbeats included) came from the broker.

        Read from aiormq's reader, which stamps every frame: a partition shows here long before
        aiormq gives up on the connection ((heartbeat + 1) * 3 s). 0.0 if it cannot be read.
        """
        amqp = getattr(getattr(self._raw, "transport", None), "connection", None)
        last = getattr(amqp, "_Connection__last_frame_time", None)
        if not isinstance(last, float):
            return 0.0
        return max(asyncio.get_running_loop().time() - last, 0.0)

    @property
    def server_version(self) -> tuple[int, ...]:
        """The broker's version, e.g. (3, 10, 8); () if it did not say."""
        transport = getattr(self._raw, "transport", None)
        properties = getattr(getattr(transport, "connection", None), "server_properties", {})
        raw = properties.get("version", b"")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        parts = [p for p in text.split(".") if p.isdigit()]
        return tuple(int(p) for p in parts)

    async def channel(self, *, confirms: bool = True, prefetch: int | None = None) -> Channel:
        with link_failures("opening a channel", lambda: self.is_closed):
            raw = await self._raw.channel(publisher_confirms=confirms, on_return_raises=False)
            underlay = await raw.get_underlay_channel()
            if prefetch is not None:
                # global=False: per consumer, before consuming (a global QoS breaks quorum queues).
                await underlay.basic_qos(prefetch_count=prefetch, global_=False)
        channel = Channel(raw, underlay, confirm_timeout=self._confirm_timeout)
        # Pruned here: the worker's periodic queue probe opens a channel every few seconds.
        self._channels = [c for c in self._channels if not c.is_closed]
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        # Bounded: a wedged broker may never answer connection.close.
        with contextlib.suppress(*CONNECTION_ERRORS):
            await asyncio.wait_for(self._raw.close(), CLOSE_TIMEOUT_S)
        self._on_close(None)
        for channel in self._channels:
            channel.abandon_waiting()
