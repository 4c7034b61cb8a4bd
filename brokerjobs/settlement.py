"""Settling deliveries: the only module that acks, republishes to a retry tier, or parks.

Retry and park are *publish with confirm, then ack*: a crash in between leaves the original
unacked, so the broker redelivers it. That may duplicate a job, never lose one.
"""

from __future__ import annotations

import logging
import traceback
from datetime import UTC, datetime
from typing import Any

from brokerjobs import envelope as wire
from brokerjobs.broker.base import MessageChannel
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.errors import PublishNacked, UnencodableMessage
from brokerjobs.identity import process_identity
from brokerjobs.retry import Decision, Failure, Park, Retry, RetryPolicy, clamp_attempt, decide
from brokerjobs.telemetry import Telemetry
from brokerjobs.topology import DEFAULT_EXCHANGE, parking_queue_name, retry_queue_name
from brokerjobs.validation import trace_id

log = logging.getLogger("brokerjobs.settlement")

MAX_TRACEBACK_CHARS = 4000
NACK_RETRY_S = 3.0  # then the original is requeued and the worker opens new channels
MAX_ERROR_CHARS = 1000


class Settlement:
    """Settles the deliveries of one main queue on the channel they arrived on."""

    def __init__(self, channel: MessageChannel, queue: str, telemetry: Telemetry) -> None:
        self._channel = channel
        self._telemetry = telemetry
        self.queue = queue
        self.parking_queue = parking_queue_name(queue)

    async def succeeded(self, delivery: Delivery) -> None:
        await self._channel.ack(delivery.delivery_tag)

    async def failed(self, delivery: Delivery, policy: RetryPolicy, failure: Failure) -> Decision:
        decision = self.decide(delivery, policy, failure)
        return await self.carry_out(delivery, policy, failure, decision)

    @staticmethod
    def decide(delivery: Delivery, policy: RetryPolicy, failure: Failure) -> Decision:
        """The retry rule's answer for this delivery's attempt (pure: ``retry.decide``)."""
        return decide(policy, clamp_attempt(policy, delivery.attempt), failure)

    async def carry_out(
        self, delivery: Delivery, policy: RetryPolicy, failure: Failure, decision: Decision
    ) -> Decision:
        """Publish the retry or parking copy with confirm, then ack the original; returns the
        decision carried out (a retry whose copy cannot be sent is parked instead)."""
        attempt = clamp_attempt(policy, delivery.attempt)
        if isinstance(decision, Retry):
            message = retry_message(delivery, self.queue, failure, decision.delay, attempt)
            try:
                await self._publish(message, retry_queue_name(self.queue, decision.delay), "retry")
            except UnencodableMessage as exc:
                # Our failure headers pushed a job that arrived fine past one frame: redelivered,
                # it would fail to settle the same way forever.
                decision = Park(f"its retry copy cannot be sent: {exc}"[:MAX_ERROR_CHARS])
            else:
                await self._channel.ack(delivery.delivery_tag)
                return decision
        await self._park(delivery, failure, decision, attempt)
        return decision

    async def _park(
        self, delivery: Delivery, failure: Failure, decision: Park, attempt: int
    ) -> None:
        """Publish the parking copy, then ack. A copy too large for one frame goes without its
        traceback, then without the producer's headers (their names kept); only if even that
        cannot be sent is the delivery rejected as it is, for the broker to dead-letter (at
        most once, with a producer's x-death as it is) instead of failing on every redelivery."""
        message = parked_message(delivery, self.queue, failure, decision, attempt)
        for smaller in (None, _without_traceback, _own_headers):
            if smaller is not None:
                message.headers = smaller(message.headers)
            if await self._parked(message):
                await self._channel.ack(delivery.delivery_tag)
                return
        log.error(
            "job %s: its parking copy cannot be sent (%s); rejected as it is",
            delivery.message_id,
            decision.reason,
        )
        await self.reject(delivery)

    async def _parked(self, message: OutgoingMessage) -> bool:
        try:
            await self._publish(message, self.parking_queue, "park")
        except UnencodableMessage as exc:
            log.warning("parking copy of %s cannot be sent: %s", message.message_id, exc)
            return False
        return True

    async def _publish(self, message: OutgoingMessage, target: str, operation: str) -> None:
        """Publish with confirm; nacks (a quorum queue between leaders) are retried a while."""
        try:
            await self._publish_once(message, target, operation)
            return
        except PublishNacked:
            pass
        from tenacity import (  # only after a nack: rare
            AsyncRetrying,
            retry_if_exception_type,
            stop_after_delay,
            wait_exponential,
        )

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(PublishNacked),
            stop=stop_after_delay(NACK_RETRY_S),
            wait=wait_exponential(multiplier=0.1, max=2),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._publish_once(message, target, operation)

    async def _publish_once(self, message: OutgoingMessage, target: str, operation: str) -> None:
        # Via the default exchange: straight to one queue, never to the other subscribers.
        with self._telemetry.sending(message, DEFAULT_EXCHANGE, target, operation=operation):
            await self._channel.publish(message, DEFAULT_EXCHANGE, target)

    async def reject(self, delivery: Delivery) -> None:
        """Dead-letter the delivery as it is: the main queue's dead-letter target is parking."""
        await self._channel.nack(delivery.delivery_tag, requeue=False)

    async def requeue(self, delivery: Delivery) -> None:
        """Give the delivery back untouched (shutdown): not the job's fault, no attempt used."""
        await self._channel.nack(delivery.delivery_tag, requeue=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _carried_headers(delivery: Delivery, queue: str) -> dict[str, Any]:
    headers = {k: v for k, v in delivery.headers.items() if k not in wire.BROKER_DEATH_HEADERS}
    # Retries arrive via the default exchange: remember where the job first came from.
    headers.setdefault(wire.ORIGIN_EXCHANGE, delivery.exchange)
    headers.setdefault(wire.ORIGIN_ROUTING_KEY, delivery.routing_key)
    headers.setdefault(wire.ORIGIN_QUEUE, queue)
    return headers


def _failure_headers(headers: dict[str, Any], failure: Failure) -> None:
    now = _now()
    headers.setdefault(wire.FIRST_FAILED_AT, now)
    headers[wire.LAST_FAILED_AT] = now
    headers[wire.ERROR_TYPE] = failure.error_type or failure.kind.value
    headers[wire.ERROR_MESSAGE] = failure.reason[:MAX_ERROR_CHARS]
    headers[wire.WORKER] = process_identity()


# What a parking copy keeps when the producer's headers do not fit: the failure envelope.
_ENVELOPE = frozenset(
    {
        wire.ATTEMPT, wire.REPLAYS, wire.ORIGIN_EXCHANGE, wire.ORIGIN_ROUTING_KEY,
        wire.ORIGIN_QUEUE, wire.ERROR_TYPE, wire.ERROR_MESSAGE, wire.PARK_REASON,
        wire.FIRST_FAILED_AT, wire.LAST_FAILED_AT, wire.PARKED_AT, wire.WORKER, wire.TRACE_ID,
    }
)  # fmt: skip


def _without_traceback(headers: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if k != wire.ERROR_TRACEBACK}


def _own_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """The failure envelope alone (each value cut short), and which headers were dropped."""
    kept = {k: v[:MAX_ERROR_CHARS] if isinstance(v, str) else v for k, v in headers.items()
            if k in _ENVELOPE and isinstance(v, str | int)}  # fmt: skip
    dropped = ", ".join(sorted(k for k in headers if k not in kept))
    kept[wire.DROPPED_HEADERS] = dropped[:MAX_ERROR_CHARS]
    return kept


def _traceback(exc: BaseException) -> str:
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:  # an exception type whose own formatting fails
        text = f"{type(exc).__qualname__} (its traceback could not be formatted)"
    return text[-MAX_TRACEBACK_CHARS:]


def _copy(delivery: Delivery, headers: dict[str, Any]) -> OutgoingMessage:
    # A job published without `type` keeps it absent (the copy is faithful); its name survives
    # in bj-origin-routing-key, which Delivery.original_job_name reads on the next hop.
    return wire.copy_of(delivery, headers)


def retry_message(
    delivery: Delivery, queue: str, failure: Failure, delay: float, attempt: int | None = None
) -> OutgoingMessage:
    headers = _carried_headers(delivery, queue)
    _failure_headers(headers, failure)
    headers[wire.ATTEMPT] = (delivery.attempt if attempt is None else attempt) + 1
    message = _copy(delivery, headers)
    # Same TTL as the tier queue's x-message-ttl: per-message TTL only fires at the head.
    message.expiration_ms = round(delay * 1000)
    return message


def parked_message(
    delivery: Delivery, queue: str, failure: Failure, decision: Park, attempt: int | None = None
) -> OutgoingMessage:
    headers = _carried_headers(delivery, queue)
    _failure_headers(headers, failure)
    headers[wire.ATTEMPT] = delivery.attempt if attempt is None else attempt
    headers[wire.PARK_REASON] = decision.reason[:MAX_ERROR_CHARS]
    headers[wire.PARKED_AT] = _now()
    if failure.exception is not None:
        headers[wire.ERROR_TRACEBACK] = _traceback(failure.exception)
    # The trace of the job's first publish: the original one, else the latest.
    first = trace_id(headers.get(wire.ORIGINAL_TRACEPARENT)) or trace_id(headers.get("traceparent"))
    if first:
        headers[wire.TRACE_ID] = first
    else:
        headers.pop(wire.TRACE_ID, None)  # a producer's own value is not ours to vouch for
    return _copy(delivery, headers)
