"""The wire format: a typed job <-> AMQP body, properties and headers.

Body: the job's JSON in UTF-8 (``content_type=application/json``). Properties: ``message_id``
(unique job id), ``type`` (job name), ``timestamp``, ``delivery_mode=2``, ``priority``.
Headers (all optional for foreign publishers): ``bj-attempt`` (1-based run number),
``bj-schema-version``, and W3C trace context (``traceparent``/``tracestate``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from brokerjobs.jobs import JobSpec, spec_of
from brokerjobs.validation import content_type_problem, json_limit_problem
from brokerjobs.validation import header_int as header_int  # re-exported: the wire's reader

CONTENT_TYPE = "application/json"
DEFAULT_MAX_JSON_DEPTH = 64
# Python's own int_max_str_digits: beyond it int() refuses anyway.
DEFAULT_MAX_JSON_NUMBER_DIGITS = 4300

ATTEMPT = "bj-attempt"
SCHEMA_VERSION = "bj-schema-version"
REPLAYS = "bj-replays"
ORIGIN_EXCHANGE = "bj-origin-exchange"
ORIGIN_ROUTING_KEY = "bj-origin-routing-key"
ORIGIN_QUEUE = "bj-origin-queue"
ERROR_TYPE = "bj-error-type"
ERROR_MESSAGE = "bj-error-message"
ERROR_TRACEBACK = "bj-error-traceback"
PARK_REASON = "bj-park-reason"
FIRST_FAILED_AT = "bj-first-failed-at"
LAST_FAILED_AT = "bj-last-failed-at"
PARKED_AT = "bj-parked-at"
WORKER = "bj-worker"
TRACE_ID = "bj-trace-id"
ORIGINAL_TRACEPARENT = "bj-original-traceparent"
REPLAY_SCAN = "bj-replay-scan"  # which replay run sent this copy back to work
DROPPED_HEADERS = "bj-dropped-headers"  # a parking copy without the producer's headers
# Headers the broker owns: never carry them over when we republish (4.x ignores client x-death).
BROKER_DEATH_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)


# A copy (retry, park, replay) cannot carry these two properties as they were: the broker refuses
# a `user_id` other than the publishing connection's user, and an `expiration` would expire the
# parked copy. They move into these headers instead (only when the original had them).
ORIGINAL_USER_ID = "bj-original-user-id"
ORIGINAL_EXPIRATION = "bj-original-expiration"


@dataclass(slots=True)
class OutgoingMessage:
    """A message ready to publish, independent of any AMQP library.

    Every AMQP basic property; None is absent on the wire (``priority=None`` is not 0,
    ``delivery_mode=None`` is not 1). Header values keep their AMQP type (``amqp_values``).
    """

    body: bytes
    message_id: str
    job_name: str | None  # the `type` property
    priority: int | None
    headers: dict[str, Any]
    timestamp: datetime | int | None = None  # an int: seconds beyond datetime's range
    content_type: str | None = CONTENT_TYPE
    expiration_ms: int | None = None
    delivery_mode: int | None = 2
    correlation_id: str | None = None
    app_id: str | None = None
    content_encoding: str | None = None
    reply_to: str | None = None
    user_id: str | None = None
    cluster_id: str | None = None

    @property
    def persistent(self) -> bool:
        return self.delivery_mode == 2


@dataclass(slots=True)
class Delivery:
    """A message as the broker delivered it, independent of any AMQP library.

    Carries every AMQP basic property as received (None = absent); header values and the
    timestamp keep their AMQP types (``amqp_values``: a timestamp beyond datetime's range is a
    ``Timestamp`` int).
    """

    body: bytes
    delivery_tag: int
    exchange: str
    routing_key: str
    redelivered: bool
    message_id: str | None = None
    job_name: str | None = None
    content_type: str | None = None
    priority: int | None = None
    timestamp: datetime | int | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    app_id: str | None = None
    expiration: str | None = None
    delivery_mode: int | None = None
    content_encoding: str | None = None
    reply_to: str | None = None
    user_id: str | None = None
    cluster_id: str | None = None

    @property
    def persistent(self) -> bool:
        return self.delivery_mode == 2

    @property
    def attempt(self) -> int:
        """The run number the headers claim (1 when absent or invalid); policies clamp it."""
        return header_int(self.headers, ATTEMPT, default=1, low=1)

    @property
    def original_job_name(self) -> str:
        """The job's name however it was first given: ``type``, else the first routing key.

        After dead-lettering through the default exchange the routing key is the queue's name,
        so a retry or replay of a job published without ``type`` names it by its origin header.
        """
        if self.job_name:
            return self.job_name
        origin = self.headers.get(ORIGIN_ROUTING_KEY)
        if isinstance(origin, str) and origin and self.exchange == "":
            return origin
        return self.routing_key


@dataclass(frozen=True, slots=True)
class Decoded:
    spec: JobSpec
    job: BaseModel


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Why a delivery cannot become a job; it is parked with this reason."""

    reason: str


def new_job_id() -> str:
    """32 random hex digits (as uuid4().hex, without the UUID object: the publish hot path)."""
    return os.urandom(16).hex()


# The basic properties a published message and its delivery share under the same name (the
# others: ``expiration_ms``/``expiration`` and ``user_id``, which copies move into headers).
_SHARED_PROPERTIES = (
    "job_name", "priority", "timestamp", "content_type", "delivery_mode", "correlation_id",
    "app_id", "content_encoding", "reply_to", "cluster_id",
)  # fmt: skip


def delivered(
    message: OutgoingMessage,
    *,
    delivery_tag: int,
    exchange: str,
    routing_key: str,
    redelivered: bool,
    headers: dict[str, Any],
) -> Delivery:
    """``message`` as a consumer receives it (what a broker that is not a wire delivers)."""
    expiration = message.expiration_ms
    return Delivery(
        message.body,
        delivery_tag,
        exchange,
        routing_key,
        redelivered,
        message_id=message.message_id,
        headers=headers,
        expiration=str(expiration) if expiration is not None else None,
        user_id=message.user_id,
        **{name: getattr(message, name) for name in _SHARED_PROPERTIES},
    )


def copy_of(delivery: Delivery, headers: dict[str, Any]) -> OutgoingMessage:
    """The same job with new headers, for retries, parking and replays: body, id and every
    property as delivered (absent stays absent), except ``user_id`` and ``expiration``, which
    move into ORIGINAL_USER_ID / ORIGINAL_EXPIRATION (see there). A job without a
    ``message_id`` gets one: it is the job id that parking and replay select by.
    """
    if delivery.user_id is not None:
        headers.setdefault(ORIGINAL_USER_ID, delivery.user_id)
    if delivery.expiration is not None:
        headers.setdefault(ORIGINAL_EXPIRATION, delivery.expiration)
    return OutgoingMessage(
        body=delivery.body,
        message_id=delivery.message_id or new_job_id(),
        headers=headers,
        **{name: getattr(delivery, name) for name in _SHARED_PROPERTIES},
    )


def encode(
    job: BaseModel,
    *,
    priority: int | None = None,
    message_id: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> OutgoingMessage:
    spec = spec_of(job)
    all_headers: dict[str, Any] = {ATTEMPT: 1, SCHEMA_VERSION: spec.version}
    if headers:
        all_headers.update(headers)
    return OutgoingMessage(
        body=job.__pydantic_serializer__.to_json(job),
        message_id=message_id or new_job_id(),
        job_name=spec.name,
        priority=spec.priority if priority is None else priority,
        headers=all_headers,
        timestamp=datetime.now(),
    )


def decode(
    delivery: Delivery,
    jobs: Mapping[str, JobSpec],
    max_body_bytes: int,
    *,
    max_depth: int = DEFAULT_MAX_JSON_DEPTH,
    max_number_digits: int = DEFAULT_MAX_JSON_NUMBER_DIGITS,
) -> Decoded | Undecodable:
    """Turn a delivery into a validated job, or say exactly why it cannot be one."""
    body = delivery.body
    if len(body) > max_body_bytes:
        return Undecodable(f"body of {len(body)} bytes exceeds the limit of {max_body_bytes}")
    name = delivery.original_job_name
    spec = jobs.get(name)
    if spec is None:
        known = ", ".join(sorted(jobs)) or "none"
        return Undecodable(f"unknown job type {name!r} (this queue handles: {known})")
    problem = content_type_problem(delivery.content_type) or json_limit_problem(
        body, max_depth, max_number_digits
    )
    if problem:
        return Undecodable(problem)
    try:
        return Decoded(spec, spec.model.model_validate_json(body))
    except ValidationError as exc:
        return Undecodable(_explain_invalid(body, spec, exc))


def _explain_invalid(body: bytes, spec: JobSpec, exc: ValidationError) -> str:
    # Never json.loads the body here: it recurses, and refuses long integers with ValueError.
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"body is not valid UTF-8 (byte {err.start}): {body[:32]!r}"
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        return f"malformed JSON: {errors[0]['msg'].removeprefix('Invalid JSON: ')}"
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:5]
    )
    return f"payload does not match {spec.model.__name__} ({spec.name}): {problems}"
