"""Declaring, inspecting and deleting exchanges and queues on an AMQP channel."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any

import aiormq
import aiormq.exceptions as amqp_errors

from brokerjobs.broker.amqp.errors import link_failures
from brokerjobs.broker.base import QueueState
from brokerjobs.broker.problems import mismatch_message, missing_message
from brokerjobs.errors import TopologyError, TopologyMismatch


class Declaring:
    """The topology operations of ``Channel`` (its ``_ch`` is the aiormq channel)."""

    _ch: aiormq.Channel

    async def declare_exchange(self, name: str, kind: str) -> None:
        await self._guard(
            self._ch.exchange_declare(name, exchange_type=kind, durable=True), "exchange", name
        )

    async def declare_queue(self, name: str, arguments: Mapping[str, Any]) -> QueueState:
        ok = await self._guard(
            self._ch.queue_declare(name, durable=True, arguments=dict(arguments)), "queue", name
        )
        return QueueState(name, ok.message_count, ok.consumer_count)

    async def declare_private_queue(self) -> str:
        """A server-named, exclusive queue that disappears with this connection."""
        ok = await self._guard(
            self._ch.queue_declare("", exclusive=True, auto_delete=True), "queue", "(private)"
        )
        return str(ok.queue)

    async def bind(self, queue: str, exchange: str, pattern: str) -> None:
        await self._guard(self._ch.queue_bind(queue, exchange, routing_key=pattern), "queue", queue)

    async def bind_exchange(self, destination: str, source: str, pattern: str) -> None:
        await self._guard(
            self._ch.exchange_bind(destination, source, routing_key=pattern), "exchange", source
        )

    async def inspect_queue(self, name: str) -> QueueState:
        """Live depth and consumer count of an existing queue (raises TopologyError if missing)."""
        ok = await self._guard(self._ch.queue_declare(name, passive=True), "queue", name)
        return QueueState(name, ok.message_count, ok.consumer_count)

    async def delete_queue(
        self, name: str, *, if_empty: bool = False, if_unused: bool = False
    ) -> None:
        """Delete a queue; with ``if_empty``/``if_unused`` the broker refuses atomically
        (TopologyError, and the channel is closed) when it holds messages or has consumers."""
        await self._guard(
            self._ch.queue_delete(name, if_empty=if_empty, if_unused=if_unused), "queue", name
        )

    async def delete_exchange(self, name: str) -> None:
        await self._guard(self._ch.exchange_delete(name), "exchange", name)

    async def _guard(self, operation: Awaitable[Any], what: str, name: str) -> Any:
        with link_failures(f"declaring {what} {name!r}", lambda: self._ch.is_closed):
            try:
                return await operation
            except amqp_errors.ChannelPreconditionFailed as exc:
                raise TopologyMismatch(mismatch_message(what, name, str(exc))) from None
            except amqp_errors.ChannelNotFoundEntity:
                raise TopologyError(missing_message(what, name)) from None
            except amqp_errors.ChannelAccessRefused as exc:
                raise TopologyError(f"access refused for {what} {name!r}: {exc}") from None
