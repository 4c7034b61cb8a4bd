"""Comparing messages as the wire sees them: every property, and headers with their types."""

from __future__ import annotations

from typing import Any

from brokerjobs import amqp_types as at
from brokerjobs import amqp_values as av
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.retry import Failure, FailureKind, Park
from brokerjobs.settlement import parked_message

PROPERTIES = (
    "content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
    "reply_to", "expiration", "message_id", "timestamp", "job_name", "user_id", "app_id",
    "cluster_id",
)  # fmt: skip


def properties_of(message: Delivery | OutgoingMessage) -> dict[str, Any]:
    found = {}
    for name in PROPERTIES:
        if name == "expiration" and isinstance(message, OutgoingMessage):
            ms = message.expiration_ms
            value: Any = str(ms) if ms is not None else None
        else:
            value = getattr(message, name)
        if name == "timestamp" and value is not None:
            value = at.timestamp_seconds(value)
        found[name] = value
    return found


def _canonical_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical_value(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_canonical_value(v) for v in value]
    if type(value) is at.Int64L:
        return at.Int64(value)
    return value


def canonical_table(headers: dict[str, Any]) -> bytes:
    """A header table encoded as RabbitMQ 4.x re-encodes it: keys sorted (nested tables too),
    an unsigned 64-bit ``L`` sent as ``l``. 3.x passes tables through byte for byte; equal
    canonical bytes = the same keys, values and wire types on either."""
    return av.encode_table(_canonical_value(headers))


def own_headers(message: Delivery | OutgoingMessage) -> bytes:
    """The headers brokerjobs does not own (not bj-*), encoded: equal bytes = equal types."""
    return canonical_table({k: v for k, v in message.headers.items() if not k.startswith("bj-")})


def wire_of(message: Delivery | OutgoingMessage) -> tuple[Any, ...]:
    return (message.body, properties_of(message), canonical_table(message.headers))


def park_copy(delivery: Delivery, queue: str) -> OutgoingMessage:
    """What a worker parks for this delivery when its handler raises PermanentFailure."""
    failure = Failure(FailureKind.PERMANENT, "declined", error_type="PermanentFailure")
    return parked_message(delivery, queue, failure, Park("declined"))


def differences(
    original: Delivery | OutgoingMessage, copy: Delivery | OutgoingMessage, moved: bool
) -> list[str]:
    """How ``copy`` differs from ``original`` beyond what brokerjobs documents: bj-* headers,
    and (``moved``) user_id/expiration carried in bj-original-user-id/-expiration."""
    found: list[str] = []
    want, got = properties_of(original), properties_of(copy)
    if moved:
        for name, header in (
            ("user_id", "bj-original-user-id"),
            ("expiration", "bj-original-expiration"),
        ):
            if want[name] is not None and copy.headers.get(header) != want[name]:
                found.append(f"{name} not carried in {header}")
            want[name] = None
    found += [f"{n}: {want[n]!r} -> {got[n]!r}" for n in PROPERTIES if want[n] != got[n]]
    if original.body != copy.body:
        found.append("body")
    if own_headers(original) != own_headers(copy):
        found.append("headers")
    return found
