"""The AMQP seam: the only module that imports aio-pika (and its protocol layer, aiormq).

Connections come from ``aio_pika.connect`` (URL parsing, TLS, client properties); the hot paths
(publish, consume, ack) use the underlying aiormq channel directly, which skips aio-pika's
per-message objects. Reconnection is *not* aio-pika's robust connection: the worker supervises
connections itself, so a consumer can never silently disappear after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
import aiormq.exceptions as amqp_errors
import pamqp
import pamqp.exceptions
import pamqp.frame
import pamqp.header
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from brokerjobs import amqp_values
from brokerjobs.ack_batching import AckBatcher
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.errors import (
    BrokerUnreachable,
    PublishError,
    PublishInterrupted,
    PublishNacked,
    TopologyError,
    TopologyMismatch,
    UnencodableMessage,
    UnroutableJob,
)
from brokerjobs.redact import redact_url
from brokerjobs.settings import Settings

log = logging.getLogger("brokerjobs.transport")

DeliveryCallback = Callable[[Delivery], Awaitable[None]]
Around = Callable[[OutgoingMessage, str, str], "AbstractContextManager[Any]"]
# Failures of the connection or channel underneath an operation; the operation may be retried.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    amqp_errors.AMQPConnectionError,
    amqp_errors.ChannelInvalidStateError,
    amqp_errors.ChannelClosed,
    ConnectionError,
    OSError,
)
CONNECT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, TimeoutError)
CLOSE_TIMEOUT_S = 5.0
# Acks are coalesced into one basic.ack(multiple) per this delay or this many acks: one frame and
# one send instead of one per job. A crash before a flush only redelivers (bounded by prefetch).
ACK_DELAY_S = 0.001
ACK_BATCH = 64
STALL_GRACE_S = 0.5
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0
_background: set[asyncio.Future[None]] = set()  # strong references to fire-and-forget closes


class _QuietConnectFailures(logging.Filter):
    """aiormq logs each failed TCP connect at ERROR; ``connect`` logs one WARNING per attempt
    (with what it tries next) instead, so one unreachable node is not a page of errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "error when creating transport: %r"


logging.getLogger("aiormq.connection").addFilter(_QuietConnectFailures())


class MessageChannel(Protocol):
    """What publishing and settling need of a channel: the seam the in-memory broker fills."""

    async def publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None: ...

    async def publish_many(
        self,
        messages: Iterable[tuple[OutgoingMessage, str, str]],
        window: int,
        around: Around | None = None,
    ) -> list[tuple[OutgoingMessage, PublishError]]: ...

    async def ack(self, delivery_tag: int) -> None: ...

    async def nack(self, delivery_tag: int, *, requeue: bool) -> None: ...


class _Unreachable(Exception):
    """Internal: one failed connection attempt (the next node is tried)."""


@dataclass(frozen=True, slots=True)
class QueueState:
    name: str
    messages: int
    consumers: int


def _url_with_heartbeat(url: str, heartbeat: int) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(heartbeat))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def connect(settings: Settings, role: str) -> Connection:
    """Connect to the first node of ``settings.amqp_urls`` that answers, for up to
    ``settings.connect_timeout`` seconds in all.

    Each attempt gets at most ``connect_attempt_timeout``: a node that accepts TCP and never
    answers (a blackhole, a partition) costs one attempt, then the next node is tried. Attempts
    rotate through every node, with exponential backoff and jitter between them. Wrong
    credentials fail at once; the password is never part of an error or a log line.
    """
    nodes = settings.amqp_urls
    properties = {"connection_name": f"brokerjobs {role} {socket.gethostname()}:{os.getpid()}"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.connect_timeout
    attempt = 0
    while True:
        node = nodes[attempt % len(nodes)]
        budget = min(settings.connect_attempt_timeout, max(deadline - loop.time(), 0.1))
        try:
            url = _url_with_heartbeat(node, settings.heartbeat)
            return Connection(
                await _connect_once(settings, url, properties, budget),
                confirm_timeout=settings.confirm_timeout,
            )
        except _Unreachable as exc:
            left = deadline - loop.time()
            if left <= 0:
                raise BrokerUnreachable(
                    f"cannot reach RabbitMQ at {settings.safe_url} after "
                    f"{settings.connect_timeout:g}s ({attempt + 1} attempt(s)): {exc}. "
                    "Is the broker running and BROKERJOBS_URL right?"
                ) from None
            pause = min(_backoff(attempt), left)
            attempt += 1
            log.warning(
                "connect to %s failed (%s); trying %s in %.1fs",
                redact_url(node), exc, redact_url(nodes[attempt % len(nodes)]), pause,
            )  # fmt: skip
            await asyncio.sleep(pause)


def _backoff(attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``: exponential from 0.2 s to 5 s, with jitter
    (0.5x-1x) so that workers cut off together do not reconnect in lockstep."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0**attempt)
    return ceiling * random.uniform(0.5, 1.0)


async def _connect_once(
    settings: Settings, url: str, properties: dict[str, Any], budget: float
) -> aio_pika.abc.AbstractConnection:
    try:
        async with asyncio.timeout(budget):
            raw = await aio_pika.connect(
                url,
                ssl_context=settings.ssl_context(),
                client_properties=properties,
                timeout=budget,
            )
    except (amqp_errors.ProbableAuthenticationError, amqp_errors.AuthenticationError):
        raise BrokerUnreachable(
            f"RabbitMQ at {settings.safe_url} refused the credentials: check the user and "
            "password in BROKERJOBS_URL and the user's permissions on the vhost"
        ) from None
    except TimeoutError:
        raise _Unreachable(f"no answer within {budget:g}s") from None
    except amqp_errors.InvalidFrameError as exc:
        if "Connection.Close" not in str(exc):
            raise _Unreachable(f"{type(exc).__name__}: {_describe(exc)}") from None
        raise BrokerUnreachable(_vhost_refused(settings, url)) from None
    except CONNECT_ERRORS as exc:
        refused = _certificate_error(exc)
        if refused is not None:  # retrying cannot help
            raise BrokerUnreachable(
                f"TLS: the certificate of RabbitMQ at {redact_url(url)} failed verification "
                f"({refused.verify_message}). Give the CA that signed it in "
                "BROKERJOBS_TLS_CA_FILE, or connect to the name the certificate is issued for."
            ) from None
        raise _Unreachable(f"{type(exc).__name__}: {_describe(exc)}") from None
    return raw


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure inside an error (aiormq wraps it in AMQPConnectionError)."""
    todo, seen = [exc], set()
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, ssl.SSLCertVerificationError):
            return error
        todo.extend(a for a in error.args if isinstance(a, BaseException))
        todo.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    return None


def _vhost_refused(settings: Settings, url: str) -> str:
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    user = unquote(parts.username or "guest")
    return (
        f"RabbitMQ at {settings.safe_url} refused to open virtual host {vhost!r} for user "
        f"{user!r}: it does not exist, or the user has no permission on it. Check the path in "
        f"BROKERJOBS_URL (`rabbitmqctl list_vhosts`), or grant access (`rabbitmqctl "
        f"set_permissions -p {vhost} {user} '.*' '.*' '.*'`)."
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    # aiormq sometimes puts the URL (with password) into connection errors.
    return "connection failed" if "@" in text else text or type(exc).__name__


class Connection:
    """One AMQP connection; ``lost`` completes when it closes for any reason."""

    def __init__(self, raw: aio_pika.abc.AbstractConnection, *, confirm_timeout: float) -> None:
        self._raw = raw
        self._confirm_timeout = confirm_timeout
        self._channels: list[Channel] = []  # strong references: aio-pika keeps only weak ones
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        raw.close_callbacks.add(self._on_close)

    def _on_close(self, _: object, exc: BaseException | None = None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    @property
    def is_closed(self) -> bool:
        return self.lost.done() or self._raw.is_closed

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
        raw = await self._raw.channel(publisher_confirms=confirms, on_return_raises=False)
        underlay = await raw.get_underlay_channel()
        if prefetch is not None:
            # global=False: per consumer, set before consuming (a global QoS breaks quorum queues).
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


class Channel:
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
        with contextlib.suppress(*CONNECTION_ERRORS):
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
        _check_confirmation(confirmation, message, exchange, routing_key)

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
                    _check_confirmation(confirmation, message, exchange, routing_key)
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
                    properties=_properties(message),
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
            self._acks.delivered(_tag(message))  # first: see ack_batching
            await callback(_to_delivery(message))

        ok = await channel.basic_consume(queue, on_message, no_ack=no_ack)
        return str(ok.consumer_tag)

    async def cancel(self, consumer_tag: str) -> None:
        await self.flush_acks()
        await self._ch.basic_cancel(consumer_tag)

    async def ack(self, delivery_tag: int) -> None:
        """Ack soon (coalesced, within ``ACK_DELAY_S``); raises at once if the channel is gone."""
        if self._ch.is_closed:
            raise amqp_errors.ChannelInvalidStateError(f"channel {self._ch.number} is closed")
        self._acks.acked(delivery_tag)
        if self._acks.pending >= ACK_BATCH:
            await self.flush_acks()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._flush_later)

    async def nack(self, delivery_tag: int, *, requeue: bool) -> None:
        async with self._settling:
            await self._send_acks()
            self._acks.settled_otherwise(delivery_tag)
            await self._ch.basic_nack(delivery_tag, requeue=requeue, wait=False)

    async def flush_acks(self) -> None:
        """Send every ack still waiting (before a cancel, a close, or a drain ends)."""
        async with self._settling:
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
        with contextlib.suppress(*CONNECTION_ERRORS):  # channel gone: the broker requeues them
            await self.flush_acks()

    async def get(self, queue: str) -> Delivery | None:
        """``basic.get`` one message (manual ack), or None when the queue is empty."""
        message = await self._ch.basic_get(queue, no_ack=False)
        if isinstance(message.delivery, spec.Basic.GetEmpty):
            return None
        self._acks.delivered(_tag(message))
        return _to_delivery(message)

    # -- topology ----------------------------------------------------------------------------

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
        ok = await self._ch.queue_declare("", exclusive=True, auto_delete=True)
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
        await self._ch.exchange_delete(name)

    async def _guard(self, operation: Awaitable[Any], what: str, name: str) -> Any:
        try:
            return await operation
        except amqp_errors.ChannelPreconditionFailed as exc:
            raise TopologyMismatch(_mismatch_message(what, name, str(exc))) from None
        except amqp_errors.ChannelNotFoundEntity:
            raise TopologyError(
                f"{what} {name!r} does not exist: run `brokerjobs topology declare MODULE:APP`"
            ) from None
        except amqp_errors.ChannelAccessRefused as exc:
            raise TopologyError(f"access refused for {what} {name!r}: {exc}") from None


def _mismatch_message(what: str, name: str, broker_text: str) -> str:
    marker = "inequivalent arg '"
    argument = broker_text.split(marker, 1)[1].split("'", 1)[0] if marker in broker_text else None
    differing = f"argument {argument!r} differs" if argument else "its arguments differ"
    return (
        f"{what} {name!r} already exists and {differing} from the plan (broker: {broker_text}). "
        "Queue arguments cannot change in place: drain and delete the queue "
        f"(rabbitmqctl delete_queue {name}) and declare again, or change the app to match."
    )


_FRESH_HEADERS = 2  # bj-attempt and bj-schema-version
# The content header must fit in one frame; larger, the broker closes the whole connection
# (FRAME_ERROR). 131072 is RabbitMQ's default frame_max; a frame has 8 bytes of framing and the
# header 12 before the property list.
MAX_PROPERTIES_BYTES = 131_072 - 8 - 12


def _property_values(message: OutgoingMessage, message_id: str) -> tuple[Any, ...]:
    """The message's basic properties in wire order (amqp_values.PROPERTY_NAMES); None = absent."""
    expiration = str(message.expiration_ms) if message.expiration_ms is not None else None
    return (
        message.content_type, message.content_encoding, message.headers or None,
        message.delivery_mode, message.priority, message.correlation_id, message.reply_to,
        expiration, message_id, message.timestamp, message.job_name, message.user_id,
        message.app_id, message.cluster_id,
    )  # fmt: skip


def _encode_properties(message: OutgoingMessage, message_id: str) -> bytes:
    # Ours, not pamqp's: pamqp sends every float as 32 bits, narrows typed integers, refuses
    # bytes and drops empty strings; amqp_values keeps each value's AMQP type.
    try:
        encoded = amqp_values.encode_properties(_property_values(message, message_id))
    except amqp_values.UnencodableError as exc:
        raise UnencodableMessage(
            f"job {message.message_id} cannot be encoded as AMQP: {exc}; it was not sent"
        ) from None
    if len(encoded) > MAX_PROPERTIES_BYTES:
        raise UnencodableMessage(
            f"job {message.message_id} cannot be sent: its properties and headers take "
            f"{len(encoded)} bytes, more than one AMQP frame holds ({MAX_PROPERTIES_BYTES})"
        )
    return encoded


class _EncodedProperties:
    """Content-header properties as aiormq publishes them: it reads ``message_id`` (to match
    returns) and calls ``marshal()``; nothing else.

    Encoding the property list costs ~8 us with our headers, a tenth of a publish; jobs of one
    type published within a second differ only in ``message_id``, so the encoding is cached per
    shape and the id spliced in (``after`` is None for a message encoded whole).
    """

    __slots__ = ("_after", "_before", "message_id")
    _cache: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
    _CACHE_LIMIT = 1024

    def __init__(self, message_id: str, before: bytes, after: bytes | None) -> None:
        self.message_id = message_id
        self._before = before
        self._after = after

    def marshal(self) -> bytes:
        if self._after is None:
            return self._before
        return self._before + self.message_id.encode() + self._after


def _shape(message: OutgoingMessage) -> tuple[Any, ...] | None:
    headers = message.headers
    # Exactly int or str: a typed int (or bool) equals a plain one but encodes differently.
    if any(type(v) is not int and type(v) is not str for v in headers.values()):
        return None
    stamp = message.timestamp
    seconds = int(stamp.timestamp()) if isinstance(stamp, datetime) else stamp
    return (
        message.content_type, message.delivery_mode, message.priority, seconds, message.job_name,
        tuple(headers.items()), message.expiration_ms, message.correlation_id, message.app_id,
        message.content_encoding, message.reply_to, message.user_id, message.cluster_id,
        len(message.message_id),
    )  # fmt: skip


def _properties(message: OutgoingMessage) -> Any:  # an _EncodedProperties, as aiormq takes it
    """Raises UnencodableMessage (before anything is sent) for values AMQP cannot carry."""
    # Only fresh publishes share a shape; retry, park and traced copies carry per-message
    # headers (times, traceparent) and would only fill the cache.
    cacheable = len(message.headers) <= _FRESH_HEADERS and message.message_id.isascii()
    shape = _shape(message) if cacheable else None
    if shape is None:
        encoded = _encode_properties(message, message.message_id)
        return _EncodedProperties(message.message_id, encoded, None)
    cache = _EncodedProperties._cache
    parts = cache.get(shape)
    if parts is None:
        size = len(message.message_id)
        zeros = _encode_properties(message, "0" * size)
        ones = _encode_properties(message, "1" * size)
        start = next(i for i, (a, b) in enumerate(zip(zeros, ones, strict=True)) if a != b)
        parts = (zeros[:start], zeros[start + size :])
        if len(cache) >= _EncodedProperties._CACHE_LIMIT:
            cache.clear()
        cache[shape] = parts
    return _EncodedProperties(message.message_id, *parts)


def _check_confirmation(
    confirmation: Any, message: OutgoingMessage, exchange: str, routing_key: str
) -> None:
    if isinstance(confirmation, spec.Basic.Ack):
        return
    if isinstance(confirmation, DeliveredMessage):
        raise UnroutableJob(
            f"job {message.job_name!r} ({message.message_id}) is unroutable: exchange "
            f"{exchange!r} has no queue bound for routing key {routing_key!r}. Declare the "
            "consumer's topology first (`brokerjobs topology declare MODULE:APP`)."
        )
    raise PublishError(f"unexpected confirmation {confirmation!r} for {message.message_id}")


def _tag(message: DeliveredMessage) -> int:
    return int(cast(spec.Basic.Deliver | spec.Basic.GetOk, message.delivery).delivery_tag or 0)


def _to_delivery(message: DeliveredMessage) -> Delivery:
    props = message.header.properties  # decoded by _decode_content_header: typed values
    frame = cast(spec.Basic.Deliver | spec.Basic.GetOk, message.delivery)
    return Delivery(
        body=message.body,
        delivery_tag=frame.delivery_tag or 0,
        exchange=frame.exchange or "",
        routing_key=frame.routing_key or "",
        redelivered=bool(frame.redelivered),
        message_id=props.message_id,
        job_name=props.message_type,
        content_type=props.content_type,
        priority=props.priority,
        timestamp=props.timestamp,
        headers=props.headers if isinstance(props.headers, dict) else {},
        correlation_id=props.correlation_id,
        app_id=props.app_id,
        expiration=props.expiration,
        delivery_mode=props.delivery_mode,
        content_encoding=props.content_encoding,
        reply_to=props.reply_to,
        user_id=props.user_id,
        cluster_id=props.cluster_id,
    )


# -- decoding content headers ----------------------------------------------------------------

_CONTENT_HEADER = struct.Struct(">HHQ")  # class id, weight, body size; then the property list
_PAMQP_NAMES = {"type": "message_type"}


def _decode_content_header(frame_data: bytes) -> pamqp.header.ContentHeader:
    """pamqp's ContentHeader, its properties decoded by amqp_values: typed, and never raising
    for a property list (undecodable bytes become a ``bj-raw-properties`` header)."""
    header = pamqp.header.ContentHeader()
    try:
        header.class_id, header.weight, header.body_size = _CONTENT_HEADER.unpack_from(frame_data)
    except struct.error as exc:  # a frame this short is a protocol error, not a message
        raise pamqp.exceptions.UnmarshalingException("ContentHeader", exc) from exc
    properties: Any = header.properties  # typed values where pamqp declares plain ones
    properties.cluster_id = None  # pamqp's default "" would be a present, empty one
    for name, value in amqp_values.decode_properties(frame_data[_CONTENT_HEADER.size :]).items():
        setattr(properties, _PAMQP_NAMES.get(name, name), value)
    return header


def _install_frame_decoder() -> bool:
    """Decode every content header with ``_decode_content_header``, once per process.

    pamqp raises on property values it cannot map to Python (a timestamp in microseconds:
    "year 58886 is out of range", a message_id that is not UTF-8); the exception ends aiormq's
    frame reader and with it the connection, and the broker gives the same message to the next
    connection: a worker reconnecting forever. aiormq has no per-connection hook for decoding
    frames (its reader calls ``pamqp.frame.unmarshal``), so the one function pamqp uses for
    content-header frames is replaced here, module-wide; method and body frames are untouched.
    """
    unmarshal = getattr(pamqp.frame, "unmarshal", None)
    hook = "_unmarshal_header_frame"
    names = getattr(getattr(unmarshal, "__code__", None), "co_names", ())
    if not pamqp.__version__.startswith("4.") or hook not in names:
        log.warning(
            "pamqp %s is not the 4.x this brokerjobs was tested with: content headers are "
            "decoded by pamqp, and a value it cannot decode closes the connection",
            pamqp.__version__,
        )
        return False
    setattr(pamqp.frame, hook, _decode_content_header)
    return True


FRAME_DECODER_INSTALLED = _install_frame_decoder()
