"""Hypothesis strategies for AMQP header values and basic properties of every field type."""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from hypothesis import strategies as st

from brokerjobs import amqp_types as at
from brokerjobs.envelope import OutgoingMessage

T = TypeVar("T")

_INT_RANGES: dict[type[at.TypedInt], tuple[int, int]] = {
    at.Int8: (-(1 << 7), (1 << 7) - 1),
    at.UInt8: (0, (1 << 8) - 1),
    at.Int16: (-(1 << 15), (1 << 15) - 1),
    at.UInt16: (0, (1 << 16) - 1),
    at.Int32: (-(1 << 31), (1 << 31) - 1),
    at.UInt32: (0, (1 << 32) - 1),
    at.Int64: (-(1 << 63), (1 << 63) - 1),
    at.Int64L: (-(1 << 63), (1 << 63) - 1),
}
typed_ints = st.one_of(
    *(st.integers(low, high).map(kind) for kind, (low, high) in _INT_RANGES.items())
)
decimals = st.builds(
    lambda mantissa, scale: Decimal(mantissa).scaleb(-scale),
    st.integers(-(1 << 31), (1 << 31) - 1),
    st.integers(0, 255),
)
timestamps = st.one_of(
    st.integers(0, at.MAX_DATETIME_SECONDS),
    st.integers(at.MAX_DATETIME_SECONDS + 1, (1 << 64) - 1),  # microseconds, ns, "negative"
    st.sampled_from([1_700_000_000_000, 1_700_000_000_000_000, 1_700_000_000_000_000_000]),
).map(at.timestamp_value)
long_strings = st.binary(max_size=20).map(lambda b: at.LongString(b"\xff" + b))  # not UTF-8
scalars = st.one_of(
    st.booleans(),
    typed_ints,
    st.floats(width=32, allow_nan=False, allow_infinity=False).map(at.Float32),
    st.floats(allow_nan=False, allow_infinity=False),
    decimals,
    st.text(max_size=30),
    long_strings,
    st.binary(max_size=30),
    timestamps,
    st.none(),
)
keys = st.text(max_size=20).filter(lambda k: not k.startswith(("bj-", "x-")))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
header_tables = st.dictionaries(keys, values, max_size=8)
short_strings = st.one_of(
    st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255),
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
)


@st.composite
def messages(draw: st.DrawFn, user_id: str | None = "guest") -> OutgoingMessage:
    """An original message with every property drawn, absent or present (user_id: the broker
    accepts only the publishing connection's user)."""

    def maybe(strategy: st.SearchStrategy[T]) -> T | None:
        return draw(st.none() | strategy)

    return OutgoingMessage(
        body=draw(st.binary(max_size=200)),
        message_id=draw(st.text(string.hexdigits, min_size=1, max_size=40)),
        job_name=maybe(short_strings),
        priority=maybe(st.integers(0, 255)),
        headers=draw(header_tables),
        timestamp=maybe(timestamps),
        content_type=maybe(short_strings),
        expiration_ms=maybe(st.integers(600_000, 10**9)),
        delivery_mode=maybe(st.sampled_from([1, 2])),
        correlation_id=maybe(short_strings),
        app_id=maybe(short_strings),
        content_encoding=maybe(short_strings),
        reply_to=maybe(short_strings),
        user_id=maybe(st.just(user_id)) if user_id else None,
        cluster_id=maybe(short_strings),
    )


def every_type_headers(n: int) -> dict[str, Any]:
    """Deterministic headers holding every AMQP field type, varied by ``n``."""
    rng = random.Random(n)
    return {
        "bool": n % 2 == 0,
        **{f"int-{k.tag.decode()}": k(rng.randint(lo, hi)) for k, (lo, hi) in _INT_RANGES.items()},
        "float32": at.Float32(rng.random()),
        "double": rng.random() * 10 ** rng.randint(-300, 300),
        "decimal": Decimal(rng.randint(-(1 << 31), (1 << 31) - 1)).scaleb(-rng.randint(0, 30)),
        "text": f"jöb {n} ✓",
        "not-utf8": at.LongString(b"\xff\xfe" + n.to_bytes(4, "big")),
        "bytes": rng.randbytes(16),
        "when": datetime.fromtimestamp(rng.randint(0, 4_000_000_000), UTC),
        "micros": at.Timestamp(1_700_000_000_000_000 + n),
        "void": None,
        "array": [n, "x", [at.Float32(0.5), None], {"k": b"\x00"}],
        "table": {"nested": {"deeper": [at.Int64L(n), Decimal("1.5")]}},
    }
