"""The Python types that keep an AMQP 0-9-1 field value's wire type (see ``amqp_values``).

A plain ``int`` or ``float`` goes out as the narrowest integer or as a 64-bit double; these
subclasses pin the wire type a decoded value had, so re-encoding it gives the same bytes.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from typing import ClassVar

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_DATETIME_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second datetime holds
_F32 = struct.Struct(">f")


class UnencodableError(TypeError):
    """A value that AMQP cannot carry (an unsupported type, or out of its type's range)."""


class TypedInt(int):
    """An integer that keeps its AMQP field type."""

    __slots__ = ()
    tag: ClassVar[bytes]
    packer: ClassVar[struct.Struct]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"


class Int8(TypedInt):
    __slots__ = ()
    tag, packer = b"b", struct.Struct(">b")


class UInt8(TypedInt):
    __slots__ = ()
    tag, packer = b"B", struct.Struct(">B")


class Int16(TypedInt):
    __slots__ = ()
    tag, packer = b"s", struct.Struct(">h")


class UInt16(TypedInt):
    __slots__ = ()
    tag, packer = b"u", struct.Struct(">H")


class Int32(TypedInt):
    __slots__ = ()
    tag, packer = b"I", struct.Struct(">i")


class UInt32(TypedInt):
    __slots__ = ()
    tag, packer = b"i", struct.Struct(">I")


class Int64(TypedInt):
    __slots__ = ()
    tag, packer = b"l", struct.Struct(">q")


class Int64L(TypedInt):
    """``L``: the 0-9-1 grammar's signed 64-bit (most clients write ``l``); RabbitMQ keeps it."""

    __slots__ = ()
    tag, packer = b"L", struct.Struct(">q")


INT_TYPES: dict[bytes, type[TypedInt]] = {
    t.tag: t for t in (Int8, UInt8, Int16, UInt16, Int32, UInt32, Int64, Int64L)
}


class Float32(float):
    """A 32-bit AMQP float (``f``), rounded to 32 bits when made; a plain float is sent as a
    64-bit double (``d``)."""

    __slots__ = ()

    def __new__(cls, value: float = 0.0) -> Float32:
        try:
            (rounded,) = _F32.unpack(_F32.pack(value))
        except (OverflowError, struct.error):
            raise UnencodableError(f"{value!r} does not fit in a 32-bit float") from None
        return super().__new__(cls, rounded)

    def __repr__(self) -> str:
        return f"Float32({float(self)!r})"


class LongString(bytes):
    """An AMQP long string (``S``) whose bytes are not UTF-8; plain bytes go out as ``x``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"LongString({bytes(self)!r})"


class Timestamp(int):
    """An AMQP timestamp (``T``, seconds since the epoch) beyond what ``datetime`` holds."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Timestamp({int(self)})"


def timestamp_value(seconds: int) -> datetime | Timestamp:
    """A wire timestamp as decoded: a UTC datetime if datetime can hold it, else Timestamp."""
    if seconds <= MAX_DATETIME_SECONDS:
        return _EPOCH + timedelta(seconds=seconds)
    return Timestamp(seconds)


def timestamp_seconds(value: datetime | int) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        seconds = int(value.timestamp())
    else:
        seconds = int(value)
    if not 0 <= seconds < 1 << 64:
        raise UnencodableError(f"timestamp {value!r} is outside 0..2**64-1 seconds")
    return seconds
