"""Message properties on the AMQP wire: encoding ours, decoding the broker's, confirmations."""

from __future__ import annotations

import logging
import struct
from datetime import datetime
from typing import Any, cast

import pamqp
import pamqp.exceptions
import pamqp.frame
import pamqp.header
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from brokerjobs import amqp_values
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.errors import PublishError, UnencodableMessage, UnroutableJob

log = logging.getLogger("brokerjobs.transport")

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


def encode_properties(message: OutgoingMessage, message_id: str) -> bytes:
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


def properties(message: OutgoingMessage) -> Any:  # an _EncodedProperties, as aiormq takes it
    """Raises UnencodableMessage (before anything is sent) for values AMQP cannot carry."""
    # Only fresh publishes share a shape; retry, park and traced copies carry per-message
    # headers (times, traceparent) and would only fill the cache.
    cacheable = len(message.headers) <= _FRESH_HEADERS and message.message_id.isascii()
    shape = _shape(message) if cacheable else None
    if shape is None:
        encoded = encode_properties(message, message.message_id)
        return _EncodedProperties(message.message_id, encoded, None)
    cache = _EncodedProperties._cache
    parts = cache.get(shape)
    if parts is None:
        size = len(message.message_id)
        zeros = encode_properties(message, "0" * size)
        ones = encode_properties(message, "1" * size)
        start = next(i for i, (a, b) in enumerate(zip(zeros, ones, strict=True)) if a != b)
        parts = (zeros[:start], zeros[start + size :])
        if len(cache) >= _EncodedProperties._CACHE_LIMIT:
            cache.clear()
        cache[shape] = parts
    return _EncodedProperties(message.message_id, *parts)


def check_confirmation(
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


def tag(message: DeliveredMessage) -> int:
    return int(cast(spec.Basic.Deliver | spec.Basic.GetOk, message.delivery).delivery_tag or 0)


def to_delivery(message: DeliveredMessage) -> Delivery:
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


def decode_content_header(frame_data: bytes) -> pamqp.header.ContentHeader:
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
    """Decode every content header with ``decode_content_header``, once per process.

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
    setattr(pamqp.frame, hook, decode_content_header)
    return True


FRAME_DECODER_INSTALLED = _install_frame_decoder()
