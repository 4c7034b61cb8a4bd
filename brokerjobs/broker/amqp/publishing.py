"""Publishing with confirms on an AMQP channel, and the watchdog that gives up on a channel
whose confirms stopped coming."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import aiormq
import aiormq.exceptions as amqp_errors

from brokerjobs.broker.amqp.errors import CONNECTION_ERRORS
from brokerjobs.broker.amqp.outbox import Outbox, Window
from brokerjobs.broker.amqp.outbox import supported as outbox_supported
from brokerjobs.broker.amqp.properties import check_confirmation, properties
from brokerjobs.broker.base import Around
from brokerjobs.envelope import OutgoingMessage
from brokerjobs.errors import (
    BrokerJobsError,
    PublishError,
    PublishInterrupted,
    PublishNacked,
    TopologyError,
)

log = logging.getLogger("brokerjobs.transport")

STALL_GRACE_S = 0.5
_background: set[asyncio.Future[None]] = set()  # strong references to fire-and-forget closes


class Publishing:
    """The publishing half of ``Channel`` (its ``_ch`` is the aiormq channel)."""

    _ch: aiormq.Channel

    def _init_publishing(self, confirm_timeout: float) -> None:
        self._confirm_timeout = confirm_timeout
        self._loop = asyncio.get_running_loop()
        self._progress_at = 0.0  # loop time of the last settled publish (or the first pending)
        self._watchdog: asyncio.Future[None] | None = None
        self._scopes: set[asyncio.Timeout] = set()  # one per publish call waiting for confirms
        self._unconfirmed = 0
        self.broken = False  # confirms stopped coming: nothing more may be trusted to this channel
        self._outbox = Outbox(self._ch) if outbox_supported(self._ch) else None

    async def close(self) -> None:
        raise NotImplementedError  # Channel's

    @property
    def unconfirmed(self) -> int:
        """Publishes waiting for their confirm."""
        return self._unconfirmed

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
        if around is None and self._outbox is not None:
            return await self._publish_pipelined(list(messages), window)
        slots = asyncio.Semaphore(window)
        failed: list[tuple[OutgoingMessage, PublishError]] = []
        tasks: set[asyncio.Future[None]] = set()

        async def one(message: OutgoingMessage, exchange: str, routing_key: str) -> None:
            try:
                with around(message, exchange, routing_key) if around else nullcontext():
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

    async def _publish_pipelined(
        self, routed: list[tuple[OutgoingMessage, str, str]], window: int
    ) -> list[tuple[OutgoingMessage, PublishError]]:
        """publish_many through the outbox: no task per message, one scope for the batch."""
        failed: list[tuple[OutgoingMessage, PublishError]] = []
        sent: list[tuple[asyncio.Future[Any], OutgoingMessage, str, str]] = []
        gate = Window(window, self._settled)
        tried = 0
        scope = self._open_scope()
        try:
            async with scope:
                for message, exchange, routing_key in routed:
                    if gate.full:
                        await gate.room()
                    tried += 1
                    try:
                        encoded = properties(message)
                        future = self._submit(message, exchange, routing_key, encoded, gate.settled)
                    except PublishError as exc:
                        failed.append((message, exc))
                        continue
                    gate.opened()
                    sent.append((future, message, exchange, routing_key))
                await gate.empty()
        except TimeoutError:
            pass  # the watchdog gave up, or the channel closed: the unsettled are interrupted
        except BaseException:
            for future, *_ in sent:
                future.cancel()
            raise
        finally:
            self._close_scope(scope)
        failed += ((m, self._interrupted(m)) for m, _, _ in routed[tried:])
        return failed + [f for f in map(self._outcome, sent) if f is not None]

    def _outcome(
        self, sent: tuple[asyncio.Future[Any], OutgoingMessage, str, str]
    ) -> tuple[OutgoingMessage, PublishError] | None:
        """None if confirmed; else the message and why (an error not a PublishError raises)."""
        future, message, exchange, routing_key = sent
        if not future.done() or future.cancelled():
            future.cancel()
            return message, self._interrupted(message)
        exc = future.exception()
        try:
            if exc is not None:
                raise self._publish_failure(exc, message, exchange, routing_key) or exc
            check_confirmation(future.result(), message, exchange, routing_key)
        except PublishError as error:
            return message, error
        return None

    async def _send(self, message: OutgoingMessage, exchange: str, routing_key: str) -> Any:
        encoded = properties(message)  # UnencodableMessage before anything is sent
        submitted = False
        scope = self._open_scope()
        try:
            async with scope:
                if self._outbox is not None:
                    future = self._submit(message, exchange, routing_key, encoded)
                    submitted = True
                    return await future
                if self.broken:
                    raise self._interrupted(message)
                return await self._ch.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=encoded,
                    mandatory=True,
                    wait=False,
                )
        except BaseException as exc:
            error = self._publish_failure(exc, message, exchange, routing_key)
            if error is None:
                raise
            raise error from None
        finally:
            if submitted:
                self._settled()
            self._close_scope(scope)

    def _submit(
        self,
        message: OutgoingMessage,
        exchange: str,
        routing_key: str,
        encoded: Any,
        on_settled: Callable[[], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one publish in the outbox; raises PublishInterrupted if the channel is gone.
        ``on_settled`` (a batch's) runs when it settles; else the caller calls _settled."""
        if self.broken or self._ch.is_closed:
            raise self._interrupted(message)
        assert self._outbox is not None
        future = self._outbox.submit(
            message.body, exchange, routing_key, encoded.marshal(), message.message_id, on_settled
        )
        self._unconfirmed += 1
        return future

    def _settled(self) -> None:
        self._unconfirmed -= 1
        self._progress_at = self._loop.time()

    def _open_scope(self) -> asyncio.Timeout:
        if not self._scopes:
            self._progress_at = self._loop.time()
        # No deadline of its own: the watchdog expires every open scope when it gives up.
        scope = asyncio.timeout(None)
        self._scopes.add(scope)
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch_confirms())
        return scope

    def _close_scope(self, scope: asyncio.Timeout) -> None:
        self._scopes.discard(scope)
        self._progress_at = self._loop.time()

    def _publish_failure(
        self, exc: BaseException, message: OutgoingMessage, exchange: str, routing_key: str
    ) -> BaseException | None:
        """Our error for what aiormq raised publishing ``message``; None: not ours to map."""
        if isinstance(exc, BrokerJobsError):
            return None
        if isinstance(exc, amqp_errors.ChannelNotFoundEntity):  # before CONNECTION_ERRORS
            return TopologyError(
                f"cannot publish job {message.message_id}: exchange {exchange!r} does not exist "
                f"(broker: {exc}). Declare the consumer's topology first (`brokerjobs topology "
                "declare MODULE:APP`) or check the publisher's exchange name."
            )
        if isinstance(exc, amqp_errors.DeliveryError):
            return PublishNacked(
                f"the broker nacked job {message.message_id} to {exchange!r}/{routing_key!r}: "
                f"{exc}; it is not stored, publish it again"
            )
        if isinstance(exc, asyncio.CancelledError):
            task = asyncio.current_task()
            if not self._ch.is_closed or (task is not None and task.cancelling()):
                return None  # our caller was cancelled: not ours to turn into an error
            return self._interrupted(message)
        # TimeoutError: the watchdog gave up (before CONNECTION_ERRORS: it is an OSError).
        # aiormq fails pending publishes with the close reason, a bare Exception() when its
        # writer died: any error once the channel or connection is closed is an interruption.
        closed = self._ch.is_closed or self._ch.connection.is_closed
        if isinstance(exc, (TimeoutError, *CONNECTION_ERRORS)) or (
            isinstance(exc, Exception) and closed
        ):
            return self._interrupted(message)
        return None

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
