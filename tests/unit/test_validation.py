"""Untrusted input checks: each reads any value without raising, and names what is wrong."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brokerjobs.validation import (
    content_type_problem,
    header_int,
    header_text,
    json_limit_problem,
    trace_id,
)
from tests.support.wire_fuzz import VALUES


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3),
        ("3", 3),
        (b"3", 3),
        (bytearray(b"12"), 12),
        (" 7 ", 7),
        (-5, 1),  # out of range: as if absent
        (0, 1),
        (10**30, 1),
        ("1" * 40, 1),
        (True, 1),  # a boolean is no count
        (1.5, 1),
        (Decimal("2"), 1),
        ("abc", 1),
        ("٣", 1),  # a non-ASCII digit
        ([1], 1),
        (None, 1),
    ],
)
def test_header_int_reads_valid_counts_and_treats_the_rest_as_absent(
    value: object, expected: int
) -> None:
    assert header_int({"bj-attempt": value}, "bj-attempt", default=1, low=1) == expected


def test_header_text_accepts_utf8_only() -> None:
    assert header_text({"k": b"caf\xc3\xa9"}, "k") == "café"
    assert header_text({"k": b"\xff"}, "k") is None
    assert header_text({"k": 5}, "k") is None
    assert header_text({"k": "x" * 2000}, "k") is None


@pytest.mark.parametrize(
    ("content_type", "problem"),
    [
        (None, None),
        ("application/json", None),
        ("Application/JSON", None),
        ("application/json; charset=utf-8", None),
        ('application/json;charset="UTF-8"', None),
        ("application/json; charset=us-ascii", None),
        ("text/json", None),
        ("application/vnd.shop.order+json", None),
        ("application/json; charset=latin-1", "charset 'latin-1' is not UTF-8"),
        ("text/plain", "is not application/json"),
        ("", "is not application/json"),
        (b"application/json", "is not a string"),
    ],
)
def test_content_type_is_compared_by_meaning(content_type: object, problem: str | None) -> None:
    found = content_type_problem(content_type)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"a": [[1]]}', None),
        (b"[" * 64 + b"]" * 64, None),
        (b"[" * 65 + b"]" * 65, "nested deeper than 64"),
        (b"[" * 100_000, "nested deeper than 64"),
        (b'{"s": "' + b"[" * 500 + b'"}', None),  # brackets inside a string do not nest
        (b'{"s": "\\"' + b"{" * 500 + b'"}', None),  # nor after an escaped quote
        (b"[]" * 10_000, None),  # many, but flat
        (b'{"n": 1' + b"0" * 4300 + b"}", "more than 4300 digits"),
        (b'{"s": "' + b"9" * 5000 + b'"}', None),  # digits in a string are text
    ],
)
def test_json_limits(body: bytes, problem: str | None) -> None:
    found = json_limit_problem(body, max_depth=64, max_number_digits=4300)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_trace_id_only_from_a_well_formed_traceparent() -> None:
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert trace_id(good) == "0af7651916cd43dd8448eb211c80319c"
    assert trace_id(good.encode()) == "0af7651916cd43dd8448eb211c80319c"
    assert trace_id("00-" + "0" * 32 + "-b7ad6b7169203331-01") is None
    assert trace_id("00-zz-yy-01") is None
    assert trace_id("00-" + "g" * 32 + "-b7ad6b7169203331-01") is None
    assert trace_id(42) is None


@settings(max_examples=500, deadline=None)
@given(value=VALUES, text=st.text(max_size=80), data=st.binary(max_size=300))
def test_checks_never_raise_on_any_input(value: object, text: str, data: bytes) -> None:
    header_int({"k": value}, "k", default=1, low=1)
    header_text({"k": value}, "k")
    trace_id(value)
    content_type_problem(value)
    content_type_problem(text)
    json_limit_problem(data, max_depth=3, max_number_digits=5)
