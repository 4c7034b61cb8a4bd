"""What a span records beyond its route, built only when the SDK reads it (for a span it
records): a delivery's or message's own attributes, and links parsed from W3C trace headers."""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping, Sequence
from typing import Any, overload

from opentelemetry.trace import Link, SpanContext, TraceFlags

from brokerjobs import envelope as wire
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.validation import parse_traceparent

# Attribute names from the messaging semantic conventions, and brokerjobs' own.
A_DELIVERY_TAG = "messaging.rabbitmq.message.delivery_tag"
A_MESSAGE_ID = "messaging.message.id"
A_JOB = "brokerjobs.job.name"
A_ATTEMPT = "brokerjobs.job.attempt"
A_ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"


class LazyAttributes(Mapping[str, Any]):
    """Span attributes built on first read (the SDK reads them only for a span it records, so
    an unsampled span never builds them); a sampler that reads them sees them all."""

    __slots__ = ("_built",)

    def __init__(self) -> None:
        self._built: dict[str, Any] | None = None

    def _build(self) -> dict[str, Any]:
        raise NotImplementedError

    def _attributes(self) -> dict[str, Any]:
        built = self._built
        if built is None:
            built = self._built = self._build()
        return built

    def __getitem__(self, key: str) -> Any:
        return self._attributes()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._attributes())

    def __len__(self) -> int:
        return len(self._attributes())

    def items(self) -> ItemsView[str, Any]:
        return self._attributes().items()


class DeliveryAttributes(LazyAttributes):
    """A process span's attributes: its route's (shared, cached) and the delivery's own."""

    __slots__ = ("_delivery", "_job", "_route")

    def __init__(self, delivery: Delivery, job: str, route: dict[str, Any]) -> None:
        super().__init__()
        self._delivery, self._job, self._route = delivery, job, route

    def _build(self) -> dict[str, Any]:
        delivery = self._delivery
        return {
            **self._route,
            A_DELIVERY_TAG: delivery.delivery_tag,
            A_MESSAGE_ID: delivery.message_id or "",
            A_JOB: self._job,
            A_ATTEMPT: delivery.attempt,
        }


class SendAttributes(LazyAttributes):
    """A send span's attributes: its route's (shared, cached) and the message's own."""

    __slots__ = ("_message", "_route")

    def __init__(self, message: OutgoingMessage, route: dict[str, Any]) -> None:
        super().__init__()
        self._message, self._route = message, route

    def _build(self) -> dict[str, Any]:
        message = self._message
        return {
            **self._route,
            A_MESSAGE_ID: message.message_id,
            A_JOB: message.job_name or self._route[A_ROUTING_KEY],
            A_ATTEMPT: wire.header_int(message.headers, wire.ATTEMPT, 1),
        }


def links_of(headers: Mapping[str, Any] | None) -> Sequence[Link]:
    """The links for ``headers`` (see ``links``), parsed only if read; () without trace headers."""
    if not headers or ("traceparent" not in headers and wire.ORIGINAL_TRACEPARENT not in headers):
        return ()
    return DeliveryLinks(headers)


class DeliveryLinks(Sequence[Link]):
    """A process span's links (see ``links``), parsed from the headers on first read."""

    __slots__ = ("_built", "_headers")

    def __init__(self, headers: Mapping[str, Any]) -> None:
        self._headers = headers
        self._built: list[Link] | None = None

    def _links(self) -> list[Link]:
        if self._built is None:
            self._built = links(self._headers)
        return self._built

    def __bool__(self) -> bool:
        return True  # only made when a traceparent header is there; read as len() otherwise

    @overload
    def __getitem__(self, index: int) -> Link: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Link]: ...

    def __getitem__(self, index: int | slice) -> Link | Sequence[Link]:
        return self._links()[index]

    def __len__(self) -> int:
        return len(self._links())

    def __iter__(self) -> Iterator[Link]:
        return iter(self._links())


# Only the rarer second link is labelled: link attributes are validated on every span.
_ORIGINAL_LINK = {"brokerjobs.link": "original"}


def links(headers: Mapping[str, Any]) -> list[Link]:
    """Links to the context that created the message and, if different, the original publish."""
    found: list[Link] = []
    creation = remote_context(headers.get("traceparent"))
    if creation is not None:
        found.append(Link(creation))
    original = remote_context(headers.get(wire.ORIGINAL_TRACEPARENT))
    if original is not None and original != creation:
        found.append(Link(original, _ORIGINAL_LINK))
    return found


def remote_context(traceparent: object) -> SpanContext | None:
    """A W3C ``traceparent`` as a remote span context; None if absent or malformed.

    Parsed here (by the one parser, ``validation.parse_traceparent``) rather than through
    ``propagate.extract``, which builds a Context and a span per header: a fifth of the cost of
    tracing a delivery.
    """
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return None
    trace, span, flags = parsed
    return SpanContext(int(trace, 16), int(span, 16), is_remote=True, trace_flags=TraceFlags(flags))
