"""Checks of untrusted input: content type, JSON shape limits and the headers brokerjobs reads.

Everything here is pure and never raises on any value a broker can deliver: a header of the
wrong type or range reads as absent, a body beyond a limit yields the reason it is parked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from brokerjobs.amqp_types import Timestamp

JSON_MEDIA_TYPES = frozenset({"application/json", "text/json"})
UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
# Header integers beyond this many digits are not counts a producer meant (10**30 attempts).
MAX_HEADER_INT_DIGITS = 18
MAX_HEADER_INT = 2**31 - 1

_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)  # possessive: linear on any input
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_TRACEPARENT = re.compile(r"\s*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s*")


def header_int(
    headers: Mapping[str, Any], key: str, default: int, low: int = 0, high: int = MAX_HEADER_INT
) -> int:
    """An integer header, or ``default`` when absent, not an integer, or outside [low, high].

    Accepts AMQP integers and decimal digits sent as a string (foreign producers do both).
    """
    value = headers.get(key)
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    if isinstance(value, str):
        text = value.strip()
        digits = text.removeprefix("-")
        if not digits.isdigit() or not digits.isascii() or len(digits) > MAX_HEADER_INT_DIGITS:
            return default
        value = int(text)
    if not isinstance(value, int) or isinstance(value, bool | Timestamp):  # a time is no count
        return default
    return int(value) if low <= value <= high else default  # plain int, not the wire's Int8


def header_text(headers: Mapping[str, Any], key: str, max_chars: int = 1000) -> str | None:
    """A short text header (str, or UTF-8 bytes), or None when absent or of another type."""
    value = headers.get(key)
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) > max_chars:
        return None
    return value


def content_type_problem(content_type: object) -> str | None:
    """Why a ``content_type`` property is not JSON in UTF-8, or None if it is (or is absent).

    Compared by meaning: any case, parameters allowed, ``+json`` suffixes are JSON.
    """
    if content_type is None or content_type == "application/json":  # the hot path: every job
        return None
    if not isinstance(content_type, str):
        return f"content_type {content_type!r} is not a string"
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media not in JSON_MEDIA_TYPES and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        return f"content_type {content_type!r} is not application/json"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
            if charset not in UTF8_CHARSETS:
                return f"content_type {content_type!r}: charset {charset!r} is not UTF-8"
    return None


def json_limit_problem(body: bytes, max_depth: int, max_number_digits: int) -> str | None:
    """Why a JSON body exceeds the nesting or number-size limits, or None.

    A cheap count rules out almost every body; only suspicious ones are scanned, iteratively
    (never recursively) and in time linear in the body's size.
    """
    deep = body.count(b"[") + body.count(b"{") > max_depth
    long = len(body) > max_number_digits
    if not deep and not long:
        return None
    text = _STRING.sub(b'""', body)
    if deep and _depth_exceeds(_NOT_BRACKET.sub(b"", text), max_depth):
        return f"JSON nested deeper than {max_depth} levels (BROKERJOBS_MAX_JSON_DEPTH)"
    if long and re.search(rb"\d{%d}" % (max_number_digits + 1), text):
        return (
            f"JSON number with more than {max_number_digits} digits "
            "(BROKERJOBS_MAX_JSON_NUMBER_DIGITS)"
        )
    return None


def _depth_exceeds(brackets: bytes, limit: int) -> bool:
    depth = 0
    for char in brackets:
        if char in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


# Control characters (a terminal runs ESC sequences), line and bidi controls, and the lone
# surrogates that stand for bytes that are not UTF-8: printed escaped, never as they are.
# Control characters, line and paragraph separators, bidi controls and marks, zero-width
# characters, and the surrogates a non-UTF-8 byte decodes to.
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte itself
        return f"\\x{code - 0xDC00:02x}"
    return match.group().encode("unicode_escape").decode("ascii")


def printable(text: str) -> str:
    """``text`` safe to print for people: what a producer sent cannot move the cursor, clear
    the screen or break a table's lines."""
    return _UNPRINTABLE.sub(_escaped, text)


class TraceParent(NamedTuple):
    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits, not all zero
    flags: int


def parse_traceparent(value: object) -> TraceParent | None:
    """A W3C ``traceparent`` header (str or bytes) read strictly; None if absent or malformed:
    the one parser of trace context, for the failure envelope and for span links."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    match = _TRACEPARENT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    version, trace, span, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace == "0" * 32 or span == "0" * 16:
        return None
    return TraceParent(trace, span, int(flags, 16))


def trace_id(traceparent: object) -> str | None:
    """The trace id of a well-formed W3C ``traceparent`` value, else None."""
    parsed = parse_traceparent(traceparent)
    return parsed.trace_id if parsed is not None else None
