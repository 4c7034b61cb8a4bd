"""Reliable publishing: confirms, persistent messages, mandatory routing, priorities, batches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

from pydantic import BaseModel

from brokerjobs.app import App
from brokerjobs.broker import default_broker
from brokerjobs.broker.base import Broker, BrokerChannel, BrokerConnection, MessageChannel
from brokerjobs.envelope import ORIGIN_ROUTING_KEY, OutgoingMessage, encode
from brokerjobs.errors import (
    BrokerUnreachable,
    ConfigError,
    PublishError,
    PublishInterrupted,
    PublishNacked,
)
from brokerjobs.middleware import Middleware, Pipeline
from brokerjobs.settings import Settings, load_settings
from brokerjobs.telemetry import Telemetry
from brokerjobs.topology import delay_route

log = logging.getLogger("brokerjobs.publisher")

Routed = tuple[OutgoingMessage, str, str]  # message, exchange, routing key
_NO_ERROR = PublishError("no error")
# Nacks and lost connections are retried with the same message_id: at-least-once, never lost.
_RETRYABLE = (PublishNacked, PublishInterrupted)


class Publisher:
    """Publishes typed jobs to an app's topic exchange; every call returns after the confirm.

    >>> async with Publisher(exchange="shop") as publisher:
    ...     job_id = await publisher.publish(SendEmail(to="a@example.com"))
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        exchange: str,
        attempts: int = 5,
        telemetry: Telemetry | None = None,
        delay_levels: int = 0,
        channel: MessageChannel | None = None,
        broker: Broker | None = None,
        middleware: Iterable[Middleware] = (),
    ) -> None:
        """``broker`` defaults to RabbitMQ at ``settings.url``; ``channel`` replaces the
        connection altogether (one already open, as the worker's settlement uses).
        ``middleware``: their ``before_publish`` hooks see every message before it is sent."""
        self.settings = settings or load_settings()
        self.broker = broker or default_broker(self.settings)
        self.telemetry = telemetry or Telemetry()
        self.exchange = exchange
        self.delay_levels = delay_levels
        self._attempts = attempts
        self._connection: BrokerConnection | None = None
        self._channel: BrokerChannel | None = None
        self._given_channel = channel
        self._pipeline = Pipeline(middleware)
        self._lock = asyncio.Lock()
        self._closed = False  # close() was called: interrupted publishes must not reconnect

    @classmethod
    def for_app(
        cls, app: App, settings: Settings | None = None, *, broker: Broker | None = None
    ) -> Publisher:
        """A publisher for ``app``'s exchange, delay levels and middleware."""
        return cls(
            settings,
            exchange=app.exchange,
            delay_levels=app.delay_levels,
            broker=broker,
            middleware=app.middleware,
        )

    async def __aenter__(self) -> Self:
        self._closed = False
        await self._ready_channel()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = None

    async def publish(
        self,
        job: BaseModel,
        *,
        priority: int | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        delay: float | timedelta | None = None,
    ) -> str:
        """Publish one job and wait for the broker's confirm; returns the job id.

        ``delay`` (seconds, rounded up to whole seconds) holds the job in the broker's delay
        levels first (see ``App(delay_levels=...)``). Raises UnroutableJob when no queue is
        bound for the job, PublishError when the broker did not confirm it after retries.
        """
        message = encode(job, priority=priority, message_id=job_id, headers=headers)
        await self._publish_all([self._route(message, delay)])
        return message.message_id

    async def publish_many(
        self, jobs: Iterable[BaseModel], *, delay: float | timedelta | None = None
    ) -> list[str]:
        """Publish jobs with pipelined confirms; returns their ids once all are confirmed."""
        routed = [self._route(encode(job), delay) for job in jobs]
        await self._publish_all(routed)
        return [message.message_id for message, _, _ in routed]

    def _route(self, message: OutgoingMessage, delay: float | timedelta | None) -> Routed:
        exchange, routing_key = self._destination(message, delay)
        if self._pipeline.publishing:
            self._pipeline.before_publish(message, exchange, routing_key)
        return message, exchange, routing_key

    def _destination(
        self, message: OutgoingMessage, delay: float | timedelta | None
    ) -> tuple[str, str]:
        name = message.job_name or ""
        if delay is None:
            return self.exchange, name
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if not self.delay_levels:
            raise ConfigError(
                "delayed publishing needs delay levels: App(..., delay_levels=N) on the consumer "
                "side and Publisher(..., delay_levels=N) (or Publisher.for_app(app))"
            )
        exchange, routing_key = delay_route(self.exchange, self.delay_levels, seconds, name)
        message.headers[ORIGIN_ROUTING_KEY] = name
        return exchange, routing_key

    async def _publish_all(self, routed: Sequence[Routed]) -> None:
        """Publish until every message is confirmed; retry only nacked or interrupted ones."""
        remaining, error = await self._publish_once(list(routed))
        if not remaining:
            return  # the common case, without building a retry loop
        if self._attempts <= 1:
            raise error
        from tenacity import (  # only when a publish was not confirmed: rare
            AsyncRetrying,
            retry_if_exception_type,
            stop_after_attempt,
            wait_exponential,
        )

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_RETRYABLE),
            stop=stop_after_attempt(self._attempts - 1),
            wait=wait_exponential(multiplier=0.1, max=2),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                log.warning("republishing %d unconfirmed job(s): %s", len(remaining), error)
                remaining, error = await self._publish_once(remaining)
                if remaining:
                    raise error

    async def _publish_once(self, routed: list[Routed]) -> tuple[list[Routed], PublishError]:
        """One try: the messages still unconfirmed (retryable) and why; unroutable raises."""
        try:
            channel = await self._ready_channel()
        except BrokerUnreachable as exc:
            return routed, PublishInterrupted(str(exc))
        around = self.telemetry.sending if self.telemetry.enabled else None
        if len(routed) == 1 and around is None:
            try:
                await channel.publish(*routed[0])
            except _RETRYABLE as exc:
                return routed, exc
            return [], _NO_ERROR
        failed = await channel.publish_many(routed, self.settings.publish_window, around)
        for _message, error in failed:
            if not isinstance(error, _RETRYABLE):
                raise error  # unroutable: retrying cannot help
        unconfirmed = {id(message) for message, _ in failed}
        remaining = [r for r in routed if id(r[0]) in unconfirmed]
        if not remaining:
            return [], _NO_ERROR
        first = failed[0][1]
        return remaining, type(first)(f"{len(remaining)} of {len(routed)} unconfirmed: {first}")

    async def _ready_channel(self) -> MessageChannel:
        if self._given_channel is not None:
            return self._given_channel
        if self._closed:
            raise PublishError("the publisher is closed; jobs still unconfirmed were not retried")
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                if self._connection is not None:
                    await self._connection.close()
                self._connection = await self.broker.connect("publisher")
                self._channel = await self._connection.channel(confirms=True)
            return self._channel
