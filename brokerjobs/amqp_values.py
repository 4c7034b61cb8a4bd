"""AMQP 0-9-1 field values and basic properties, decoded and encoded faithfully (pure Python).

pamqp maps wire values onto Python types and back by guessing: every float goes out as a 32-bit
float, every int as the narrowest integer type, ``bytes`` are refused, a timestamp past 2106 is
read as milliseconds and one past year 9999 raises (killing the connection that read it). Here a
decoded value keeps its wire type, so re-encoding it gives the same bytes:

==========  =====================================  =====================================
wire type   decoded as                              plain Python values encode as
==========  =====================================  =====================================
``t``       ``bool``                                ``bool``
``b B s u`` ``Int8 UInt8 Int16 UInt16`` (int)       ``int``: the narrowest of b s u I i l
``I i l L`` ``Int32 UInt32 Int64 Int64L`` (int)
``f`` ``d`` ``Float32`` (float), ``float``          ``float``: ``d`` (64-bit)
``D``       ``Decimal``                             ``Decimal``
``S``       ``str``, or ``LongString`` (bytes)      ``str``
            when it is not UTF-8
``x``       ``bytes``                               ``bytes``, ``bytearray``
``T``       ``datetime`` (UTC), or ``Timestamp``     ``datetime`` (naive = UTC)
            (int seconds) beyond year 9999
``A`` ``F`` ``list``, ``dict``                      ``list``/``tuple``, ``dict``
``V``       ``None``                                ``None``
==========  =====================================  =====================================

Short strings (properties, table keys) that are not UTF-8 decode with ``surrogateescape`` and
encode back to the same bytes. A property list that still cannot be decoded (it cannot come
from RabbitMQ, which parses every header table on publish) becomes a single header
``bj-raw-properties`` holding its bytes, so nothing is lost and nothing raises.
The value types live in ``amqp_types``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from brokerjobs.amqp_types import (
    INT_TYPES,
    Float32,
    Int8,
    Int16,
    Int32,
    Int64,
    LongString,
    Timestamp,
    TypedInt,
    UInt16,
    UInt32,
    UnencodableError,
    timestamp_seconds,
    timestamp_value,
)

__all__ = [  # UnencodableError, Timestamp: still imported from here by broker.amqp, parking_cli
    "MAX_DEPTH",
    "PROPERTY_NAMES",
    "RAW_PROPERTIES",
    "Timestamp",
    "UnencodableError",
    "decode_properties",
    "decode_table",
    "encode_properties",
    "encode_table",
    "encode_value",
]

RAW_PROPERTIES = "bj-raw-properties"
MAX_DEPTH = 100  # nested tables/arrays; deeper ones are undecodable (no recursion blow-up)
PROPERTY_NAMES = (
    "content_type", "content_encoding", "headers", "delivery_mode", "priority",
    "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "type",
    "user_id", "app_id", "cluster_id",
)  # fmt: skip
_FLAGS = {name: 1 << (15 - i) for i, name in enumerate(PROPERTY_NAMES)}
_OCTETS = frozenset({"delivery_mode", "priority"})
_U8, _U16, _U32, _I32, _U64 = (struct.Struct(f">{c}") for c in "BHIiQ")
_DECIMAL = struct.Struct(">Bi")
_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")


class UndecodableError(ValueError):
    """Internal: the bytes are not a valid AMQP value."""


# -- decoding ------------------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise UndecodableError(f"truncated at byte {self.pos}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, packer: struct.Struct) -> Any:
        (value,) = packer.unpack_from(self.data, self.pos)  # struct.error when short
        self.pos += packer.size
        return value

    def longstr(self) -> bytes:
        return self.take(self.unpack(_U32))


def _read_shortstr(reader: _Reader) -> str:
    size = reader.unpack(_U8)
    return reader.take(size).decode("utf-8", "surrogateescape")


def _read_longstr(reader: _Reader) -> str | LongString:
    raw = reader.longstr()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return LongString(raw)


def _read_decimal(reader: _Reader) -> Decimal:
    scale, value = _DECIMAL.unpack(reader.take(5))
    return Decimal(value).scaleb(-scale)


def _read_value(reader: _Reader, depth: int) -> Any:
    tag = reader.take(1)
    int_type = INT_TYPES.get(tag)
    if int_type is not None:
        return int_type(reader.unpack(int_type.packer))
    scalar = _SCALARS.get(tag)
    if scalar is not None:
        return scalar(reader)
    if depth >= MAX_DEPTH:
        raise UndecodableError(f"nested deeper than {MAX_DEPTH}")
    if tag == b"F":
        return _read_table(reader, depth + 1)
    if tag == b"A":
        end = reader.unpack(_U32) + reader.pos
        items = []
        while reader.pos < end:
            items.append(_read_value(reader, depth + 1))
        _check_end(reader, end)
        return items
    raise UndecodableError(f"unknown field type {tag!r} at byte {reader.pos - 1}")


_SCALARS: dict[bytes, Callable[[_Reader], Any]] = {
    b"t": lambda r: r.take(1) != b"\x00",
    b"f": lambda r: Float32(r.unpack(_F32)),
    b"d": lambda r: r.unpack(_F64),
    b"D": _read_decimal,
    b"S": _read_longstr,
    b"x": lambda r: r.longstr(),
    b"T": lambda r: timestamp_value(r.unpack(_U64)),
    b"V": lambda r: None,
}


def _check_end(reader: _Reader, end: int) -> None:
    if reader.pos != end:
        raise UndecodableError(f"a value overruns its table or array at byte {reader.pos}")


def _read_table(reader: _Reader, depth: int = 0) -> dict[str, Any]:
    end = reader.unpack(_U32) + reader.pos
    if end > len(reader.data):
        raise UndecodableError(f"table longer than the data at byte {reader.pos}")
    table: dict[str, Any] = {}
    while reader.pos < end:
        key = _read_shortstr(reader)
        table[key] = _read_value(reader, depth)
    _check_end(reader, end)
    return table


def decode_table(data: bytes) -> dict[str, Any]:
    """A field table (with its 4-byte length) as typed values; raises UndecodableError."""
    return _read_table(_Reader(data))


def decode_properties(data: bytes) -> dict[str, Any]:
    """The content header's property list (flag words, then values): the present properties by
    name. Never raises: undecodable bytes come back as ``{"headers": {RAW_PROPERTIES: data}}``.
    """
    try:
        return _decode_properties(_Reader(data))
    except Exception:  # whatever the bytes, never an exception out of the frame reader
        return {"headers": {RAW_PROPERTIES: bytes(data)}}


def _decode_properties(reader: _Reader) -> dict[str, Any]:
    flags = word = reader.unpack(_U16)
    while word & 1:  # continuation flag words: no 0-9-1 property lives there
        word = reader.unpack(_U16)
        if word & ~1:
            raise UndecodableError("property flags beyond the 0-9-1 set")
    if flags & 0b10:
        raise UndecodableError("unknown property flag 0x0002")
    found: dict[str, Any] = {}
    for name in PROPERTY_NAMES:
        if flags & _FLAGS[name]:
            found[name] = _read_property(reader, name)
    if reader.pos != len(reader.data):
        raise UndecodableError(f"{len(reader.data) - reader.pos} bytes after the properties")
    return found


def _read_property(reader: _Reader, name: str) -> Any:
    if name == "headers":
        return _read_table(reader)
    if name in _OCTETS:
        return reader.unpack(_U8)
    if name == "timestamp":
        return timestamp_value(reader.unpack(_U64))
    return _read_shortstr(reader)


# -- encoding ------------------------------------------------------------------------------


def _shortstr(value: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise UnencodableError(f"{what}: a short string is required, not {type(value).__name__}")
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > 255:
        raise UnencodableError(f"{what}: {len(raw)} bytes exceed a short string's 255")
    return bytes((len(raw),)) + raw


def _longstr(tag: bytes, raw: bytes) -> bytes:
    if len(raw) >= 1 << 32:
        raise UnencodableError("a long string or byte array of 4 GiB or more")
    return tag + _U32.pack(len(raw)) + raw


def _encode_int(value: int) -> bytes:
    if isinstance(value, TypedInt):
        try:
            return value.tag + bytes(value.packer.pack(value))
        except struct.error:
            raise UnencodableError(f"{value!r} is out of range for its type") from None
    for candidate, (low, high) in _RANGES.items():
        if low <= value <= high:
            return candidate.tag + candidate.packer.pack(value)
    raise UnencodableError(f"integer {value} does not fit in 64 bits")


# Plain ints: the narrowest type that fits, in pamqp's order (so fresh publishes are unchanged).
_RANGES: dict[type[TypedInt], tuple[int, int]] = {
    Int8: (-(1 << 7), (1 << 7) - 1),
    Int16: (-(1 << 15), (1 << 15) - 1),
    UInt16: (0, (1 << 16) - 1),
    Int32: (-(1 << 31), (1 << 31) - 1),
    UInt32: (0, (1 << 32) - 1),
    Int64: (-(1 << 63), (1 << 63) - 1),
}


def _encode_float(value: float) -> bytes:
    if not math.isfinite(value):  # RabbitMQ closes the connection (541) on NaN/Infinity
        raise UnencodableError(f"{value!r}: RabbitMQ accepts only finite floats")
    return (b"f" + _F32.pack(value)) if isinstance(value, Float32) else (b"d" + _F64.pack(value))


def _encode_decimal(value: Decimal) -> bytes:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise UnencodableError(f"decimal {value} is not finite")
    scale = max(0, -exponent)
    mantissa = int(value.scaleb(scale))
    if scale > 255 or not -(1 << 31) <= mantissa < 1 << 31:
        raise UnencodableError(f"decimal {value}: AMQP holds scale 0..255, a 32-bit mantissa")
    return b"D" + _DECIMAL.pack(scale, mantissa)


def encode_value(value: Any, depth: int = 0) -> bytes:
    """One field value with its type tag; raises UnencodableError."""
    for kind in type(value).__mro__:  # the most specific type first: bool before int
        encoder = _ENCODERS.get(kind)
        if encoder is not None:
            return encoder(value, depth)
    if isinstance(value, Mapping):
        return _encode_nested(value, depth)
    raise UnencodableError(f"{type(value).__name__} is not an AMQP field type ({value!r:.60})")


def _encode_nested(value: Any, depth: int) -> bytes:
    if depth >= MAX_DEPTH:
        raise UnencodableError(f"nested deeper than {MAX_DEPTH}")
    if isinstance(value, Mapping):
        return b"F" + encode_table(value, depth + 1)
    body = b"".join(encode_value(item, depth + 1) for item in value)
    return b"A" + _U32.pack(len(body)) + body


def _encode_timestamp(value: datetime | int, _: int = 0) -> bytes:
    return b"T" + _U64.pack(timestamp_seconds(value))


_ENCODERS: dict[type, Callable[[Any, int], bytes]] = {
    str: lambda value, _: _longstr(b"S", value.encode("utf-8", "surrogateescape")),
    bool: lambda value, _: b"t\x01" if value else b"t\x00",
    Timestamp: _encode_timestamp,
    datetime: _encode_timestamp,
    int: lambda value, _: _encode_int(value),
    float: lambda value, _: _encode_float(value),
    Decimal: lambda value, _: _encode_decimal(value),
    LongString: lambda value, _: _longstr(b"S", value),
    bytes: lambda value, _: _longstr(b"x", value),
    bytearray: lambda value, _: _longstr(b"x", bytes(value)),
    type(None): lambda value, _: b"V",
    dict: _encode_nested,
    list: _encode_nested,
    tuple: _encode_nested,
}


def encode_table(table: Mapping[str, Any], depth: int = 0) -> bytes:
    """A field table, keys in their order; raises UnencodableError naming the key."""
    parts = []
    for key, value in table.items():
        parts.append(_shortstr(key, "header name"))
        try:
            parts.append(encode_value(value, depth))
        except UnencodableError as exc:
            raise UnencodableError(f"header {key!r}: {exc}") from None
    body = b"".join(parts)
    return _U32.pack(len(body)) + body


def encode_properties(values: Sequence[Any]) -> bytes:
    """The property list for ``values`` in PROPERTY_NAMES order (None = absent)."""
    flags = 0
    parts = []
    for name, value in zip(PROPERTY_NAMES, values, strict=True):
        if value is None:
            continue
        flags |= _FLAGS[name]
        parts.append(_encode_property(name, value))
    return _U16.pack(flags) + b"".join(parts)


def _encode_property(name: str, value: Any) -> bytes:
    if name == "headers":
        return encode_table(value)
    if name in _OCTETS:
        if not isinstance(value, int) or not 0 <= value <= 255:
            raise UnencodableError(f"{name} {value!r} is not an octet (0..255)")
        return _U8.pack(value)
    if name == "timestamp":
        return _U64.pack(timestamp_seconds(value))
    return _shortstr(value, name)
