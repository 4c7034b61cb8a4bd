"""The AMQP codec: every field type keeps its type, and no property list makes decoding raise."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pamqp.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brokerjobs import amqp_types as at
from brokerjobs import amqp_values as av
from brokerjobs.broker.amqp import properties as transport
from tests.support.amqp_strategies import every_type_headers, header_tables, short_strings

ALL = list(av.PROPERTY_NAMES)


def property_list(**present: Any) -> bytes:
    return av.encode_properties([present.get(name) for name in ALL])


@settings(max_examples=300, deadline=None)
@given(header_tables)
def test_a_decoded_table_encodes_back_to_the_same_bytes(table: dict[str, Any]) -> None:
    wire = av.encode_table(table)
    decoded = av.decode_table(wire)
    assert av.encode_table(decoded) == wire
    assert av.decode_table(av.encode_table(decoded)).keys() == table.keys()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_no_bytes_make_the_property_decoder_raise(data: bytes) -> None:
    decoded = av.decode_properties(data)
    assert isinstance(decoded, dict)


@settings(max_examples=200, deadline=None)
@given(header_tables, short_strings, st.integers(0, (1 << 64) - 1))
def test_every_property_list_survives_the_content_header_decoder(
    headers: dict[str, Any], text: str, stamp: int
) -> None:
    values: dict[str, Any] = {name: text for name in ALL}
    values.update(headers=headers or None, delivery_mode=2, priority=0, timestamp=stamp)
    frame = struct.pack(">HHQ", 60, 0, 5) + property_list(**values)
    header = transport.decode_content_header(frame)
    properties = header.properties
    assert header.body_size == 5
    assert properties.message_type == properties.message_id == text
    assert properties.timestamp is not None
    assert at.timestamp_seconds(properties.timestamp) == stamp
    assert av.encode_table(properties.headers or {}) == av.encode_table(headers)


def test_pamqp_content_headers_go_through_the_brokerjobs_decoder() -> None:
    assert transport.FRAME_DECODER_INSTALLED
    assert pamqp.frame._unmarshal_header_frame is transport.decode_content_header


@pytest.mark.parametrize(
    "seconds",
    [1_700_000_000_000, 1_700_000_000_000_000, 1_700_000_000_000_000_000, (1 << 64) - 1],
)
def test_a_timestamp_in_ms_us_or_ns_stays_its_raw_seconds(seconds: int) -> None:
    # pamqp divided values past 2106 by 1000 and raised past year 9999 ("year 58886").
    decoded = av.decode_properties(
        property_list(timestamp=seconds, headers={"t": at.Timestamp(seconds)})
    )
    assert decoded["timestamp"] == at.Timestamp(seconds) == decoded["headers"]["t"]
    assert isinstance(decoded["timestamp"], at.Timestamp)


def test_a_timestamp_datetime_can_hold_is_a_utc_datetime() -> None:
    decoded = av.decode_properties(property_list(timestamp=5_000_000_000))  # year 2128
    assert decoded["timestamp"] == datetime(2128, 6, 11, 8, 53, 20, tzinfo=UTC)


def test_values_keep_the_types_pamqp_lost() -> None:
    table = {
        "double": 0.1,
        "float": at.Float32(0.1),
        "wide": at.Int64(5),
        "unsigned": at.UInt32(7),
        "bytes": b"\x00\xff",
        "latin1": at.LongString(b"caf\xe9"),
        "decimal": Decimal("-0.01"),
        "void": None,
    }
    decoded = av.decode_table(av.encode_table(table))
    assert decoded == table
    assert [type(v) for v in decoded.values()] == [type(v) for v in table.values()]
    assert decoded["double"] == 0.1  # pamqp: 0.10000000149011612


def test_a_short_string_that_is_not_utf8_comes_back_byte_for_byte() -> None:
    wire = property_list(message_id=b"\xff\xfeid".decode("utf-8", "surrogateescape"))
    decoded = av.decode_properties(wire)
    assert av.encode_properties([decoded.get(name) for name in ALL]) == wire


def test_every_type_table_round_trips() -> None:
    table = every_type_headers(7)
    assert av.encode_table(av.decode_table(av.encode_table(table))) == av.encode_table(table)


def test_undecodable_property_lists_degrade_to_their_raw_bytes() -> None:
    unknown_type = struct.pack(">H", 0x2000) + b"\x00\x00\x00\x03\x01kU"
    deep: dict[str, list[Any]] = {"k": []}
    cursor = deep["k"]
    for _ in range(av.MAX_DEPTH + 5):
        cursor.append([])
        cursor = cursor[0]
    too_deep = struct.pack(">H", 0x2000) + _raw_table(deep)
    for data in (unknown_type, too_deep, b"", b"\x80\x00\x05ab"):
        assert av.decode_properties(data) == {"headers": {av.RAW_PROPERTIES: data}}


def _raw_table(table: dict[str, Any]) -> bytes:
    def value(v: Any) -> bytes:
        body = b"".join(value(x) for x in v)
        return b"A" + struct.pack(">I", len(body)) + body

    body = b"".join(bytes([len(k)]) + k.encode() + value(v) for k, v in table.items())
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ({1, 2}, "set is not an AMQP field type"),
        (1 << 64, "does not fit in 64 bits"),
        (float("nan"), "only finite floats"),
        (at.Float32(float("inf")), "only finite floats"),
        (Decimal("NaN"), "not finite"),
        (Decimal("1e-300"), "scale 0..255"),
        (datetime(1969, 1, 1, tzinfo=UTC), "outside 0"),
    ],
)
def test_a_value_amqp_cannot_carry_is_refused_with_its_header_named(value: Any, why: str) -> None:
    with pytest.raises(at.UnencodableError, match=f"header 'k': .*{why}"):
        av.encode_table({"k": value})


def test_plain_values_encode_as_pamqp_did_except_floats() -> None:
    assert av.encode_value(5) == b"b\x05"
    assert av.encode_value(70_000) == b"I" + struct.pack(">i", 70_000)
    assert av.encode_value(0.5) == b"d" + struct.pack(">d", 0.5)  # pamqp: 32-bit "f"
    assert av.encode_value(bytearray(b"ab")) == b"x\x00\x00\x00\x02ab"
