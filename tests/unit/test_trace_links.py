"""Parsing ``traceparent`` headers into span links agrees with OpenTelemetry's own propagator."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from brokerjobs.telemetry.span_data import links as _links
from brokerjobs.telemetry.span_data import remote_context as _remote_context

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"

CASES = [
    VALID,
    OTHER,
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future-fields",
    VALID + "-extra",  # version 00 has exactly four fields
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case is invalid
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero span id
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",  # short span id
    "00-0af7651916cd43dd_448eb211c80319c-b7ad6b7169203331-01",
    "",
    "garbage",
]


@pytest.mark.parametrize("header", CASES)
def test_remote_context_matches_the_w3c_propagator(header: str) -> None:
    expected = trace.get_current_span(
        TraceContextTextMapPropagator().extract({"traceparent": header})
    ).get_span_context()
    parsed = _remote_context(header)
    if not expected.is_valid:
        assert parsed is None
    else:
        assert parsed == expected
        assert parsed is not None and parsed.is_remote
        assert parsed.trace_flags == expected.trace_flags


def test_headers_from_amqp_may_be_bytes_or_missing() -> None:
    assert _remote_context(VALID.encode()) == _remote_context(VALID)
    assert _remote_context(None) is None
    assert _remote_context(42) is None


def test_links_to_creation_and_distinct_original_publish() -> None:
    (creation,) = _links({"traceparent": VALID})
    assert creation.context == _remote_context(VALID)
    assert not creation.attributes
    both = _links({"traceparent": VALID, "bj-original-traceparent": OTHER})
    assert [link.context for link in both] == [_remote_context(VALID), _remote_context(OTHER)]
    assert dict(both[1].attributes or {}) == {"brokerjobs.link": "original"}
    same = _links({"traceparent": VALID, "bj-original-traceparent": VALID})
    assert len(same) == 1
    assert _links({}) == []
