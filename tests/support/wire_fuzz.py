"""Hypothesis strategies for hostile wire messages: bodies, properties and header tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st
from pydantic import BaseModel

from brokerjobs import RetryPolicy, job
from brokerjobs.envelope import OutgoingMessage, new_job_id

JOB_NAME = "fuzz.job"


@job(JOB_NAME, retry=RetryPolicy(delays=(1.0, 2.0), max_attempts=3))
class FuzzJob(BaseModel):
    n: int
    fail: bool = False


# Values of every AMQP 0-9-1 field-table type, including the edges that broke decoders.
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.sampled_from([0, -1, -5, 2**31, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(
        allow_nan=False, allow_infinity=False, places=2, min_value=-(10**6), max_value=10**6
    ),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)).map(
        lambda d: d.replace(microsecond=0, tzinfo=UTC)
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
HEADER_KEYS = st.sampled_from(
    [
        "bj-attempt",
        "bj-schema-version",
        "bj-replays",
        "traceparent",
        "tracestate",
        "bj-origin-routing-key",
        "bj-origin-exchange",
        "bj-first-failed-at",
        "bj-trace-id",
        "bj-original-traceparent",
        "x-death",
        "x-delivery-count",
    ]
) | st.text(min_size=1, max_size=12)
ATTEMPTS = st.one_of(
    st.integers(),
    st.sampled_from([0, -5, 10**30, 3, "2", b"7", "-1", "abc", 1.5, Decimal("2"), True]),
)
HEADERS = st.dictionaries(HEADER_KEYS, VALUES, max_size=6) | st.fixed_dictionaries(
    {"bj-attempt": ATTEMPTS}, optional={"traceparent": st.text(max_size=60)}
)

GOOD_BODY = st.builds(
    lambda n, fail: json.dumps({"n": n, "fail": fail}).encode(),
    st.integers(-(10**6), 10**6),
    st.booleans(),
)
BODIES = st.one_of(
    GOOD_BODY,
    st.binary(max_size=200),
    st.integers(1, 3000).map(lambda d: b'{"n": 1, "x": ' + b"[" * d + b"]" * d + b"}"),
    st.integers(1, 3000).map(lambda d: b"[" * d),
    st.integers(4200, 6000).map(lambda d: b'{"n": 1' + b"0" * d + b"}"),
    st.just(b'{"n": "lots"}'),
    st.just(b'{"n": 1, "fail": true, "\xff": 1}'),
    st.text(max_size=100).map(str.encode),
)
CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            'application/json;charset="UTF-8"',
            "application/json; charset=latin-1",
            "application/vnd.shop+json",
            "text/plain",
            "",
        ]
    ),
    st.text(max_size=30),
)


@st.composite
def messages(draw: Any) -> OutgoingMessage:
    """One message as a hostile or buggy producer might publish it."""
    return OutgoingMessage(
        body=draw(BODIES),
        message_id=new_job_id(),
        job_name=draw(st.one_of(st.none(), st.just(JOB_NAME), st.text(max_size=20))),
        priority=draw(st.integers(0, 255)),
        headers=draw(HEADERS),
        content_type=draw(CONTENT_TYPES),
    )
