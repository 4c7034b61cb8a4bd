"""What the broker writes on a message: dead-lettering history and the delivered form."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from brokerjobs.broker.memory.queues import Stored
from brokerjobs.envelope import Delivery, OutgoingMessage, delivered

# RabbitMQ 3.13 added the x-last-death-* headers.
LAST_DEATH_SINCE = (3, 13)


def dead_copy(stored: Stored, queue: str, reason: str, version: tuple[int, ...]) -> OutgoingMessage:
    """The dead-lettered copy: RabbitMQ records the death in ``x-death`` and drops the TTL."""
    message = stored.message
    headers = dict(message.headers)
    deaths = [d for d in headers.get("x-death") or () if isinstance(d, dict)]
    same = [d for d in deaths if d.get("queue") == queue and d.get("reason") == reason]
    death: dict[str, Any] = {
        "count": int(same[0].get("count", 0)) + 1 if same else 1,
        "reason": reason,
        "queue": queue,
        "time": datetime.now(UTC).replace(microsecond=0),
        "exchange": stored.exchange,
        "routing-keys": [stored.routing_key],
    }
    if message.expiration_ms is not None:
        death["original-expiration"] = str(message.expiration_ms)
    headers["x-death"] = [death, *(d for d in deaths if d not in same)]
    headers.setdefault("x-first-death-exchange", stored.exchange)
    headers.setdefault("x-first-death-queue", queue)
    headers.setdefault("x-first-death-reason", reason)
    if version >= LAST_DEATH_SINCE:
        headers["x-last-death-exchange"] = stored.exchange
        headers["x-last-death-queue"] = queue
        headers["x-last-death-reason"] = reason
    return replace(message, headers=headers, expiration_ms=None)


def delivery_of(stored: Stored, tag: int, *, delivery_count: int | None = None) -> Delivery:
    """The message as a consumer receives it, with headers of its own to change freely."""
    message = stored.message
    headers = copy.deepcopy(message.headers)
    if delivery_count:
        headers["x-delivery-count"] = delivery_count
    return delivered(
        message,
        delivery_tag=tag,
        exchange=stored.exchange,
        routing_key=stored.routing_key,
        redelivered=stored.redelivered,
        headers=headers,
    )
