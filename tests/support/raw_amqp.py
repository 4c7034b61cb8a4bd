"""Hand-built AMQP 0-9-1 content-header properties, for values well-behaved clients refuse.

``RawProperties`` stands in for pamqp's properties object on aiormq's ``basic_publish``: aiormq
reads ``message_id`` and calls ``marshal()``, so the bytes go on the wire exactly as built here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

# Property flags, in wire order (AMQP 0-9-1 basic class).
_FLAGS = {
    "content_type": 0x8000,
    "content_encoding": 0x4000,
    "headers": 0x2000,
    "delivery_mode": 0x1000,
    "priority": 0x0800,
    "correlation_id": 0x0400,
    "reply_to": 0x0200,
    "expiration": 0x0100,
    "message_id": 0x0080,
    "timestamp": 0x0040,
    "type": 0x0020,
    "user_id": 0x0010,
    "app_id": 0x0008,
}


def shortstr(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def longstr(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def table(entries: Iterable[tuple[str, bytes]]) -> bytes:
    """A field table from (key, already-typed value) pairs, e.g. ``("k", field_int64(1))``."""
    return longstr(b"".join(shortstr(key.encode()) + value for key, value in entries))


def array(values: Iterable[bytes]) -> bytes:
    return b"A" + longstr(b"".join(values))


def field_table(entries: Iterable[tuple[str, bytes]]) -> bytes:
    return b"F" + table(entries)


def field_int64(value: int) -> bytes:
    return b"l" + struct.pack(">q", value)


def field_int8(value: int) -> bytes:
    return b"b" + struct.pack(">b", value)


def field_uint32(value: int) -> bytes:
    return b"i" + struct.pack(">I", value)


def field_double(value: float) -> bytes:
    return b"d" + struct.pack(">d", value)


def field_float(value: float) -> bytes:
    return b"f" + struct.pack(">f", value)


def field_decimal(scale: int, value: int) -> bytes:
    return b"D" + struct.pack(">Bi", scale, value)


def field_timestamp(seconds: int) -> bytes:
    return b"T" + struct.pack(">Q", seconds)


def field_longstr(value: bytes) -> bytes:
    return b"S" + longstr(value)


def field_bytes(value: bytes) -> bytes:
    return b"x" + longstr(value)


def field_bool(value: bool) -> bytes:
    return b"t" + bytes([value])


VOID = b"V"


class RawProperties:
    """Content-header properties marshalled by hand; any field may hold any bytes."""

    def __init__(
        self,
        message_id: str,
        *,
        job_name: str | None = None,
        content_type: str | None = None,
        timestamp: int | None = None,
        headers: bytes | None = None,
        delivery_mode: int = 2,
    ) -> None:
        self.message_id = message_id
        self._fields: dict[str, bytes] = {"delivery_mode": bytes([delivery_mode])}
        self._fields["message_id"] = shortstr(message_id.encode())
        if content_type is not None:
            self._fields["content_type"] = shortstr(content_type.encode())
        if headers is not None:
            self._fields["headers"] = headers
        if timestamp is not None:
            self._fields["timestamp"] = struct.pack(">Q", timestamp)
        if job_name is not None:
            self._fields["type"] = shortstr(job_name.encode())

    def marshal(self) -> bytes:
        flags = 0
        parts = []
        for name, flag in _FLAGS.items():
            if name in self._fields:
                flags |= flag
                parts.append(self._fields[name])
        return struct.pack(">H", flags) + b"".join(parts)
