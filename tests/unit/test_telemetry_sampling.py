"""A process span's own attributes and links are built only for a span that records: an
unsampled delivery builds none, a recorded one gets all of them, and a sampler that reads the
attributes sees all of them; send spans the same."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.telemetry import Telemetry

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class CountingDelivery(Delivery):
    """A delivery that counts reads of ``attempt`` (the header parse a span attribute needs)."""

    reads = 0

    @property
    def attempt(self) -> int:
        CountingDelivery.reads += 1
        return 1


def delivery() -> CountingDelivery:
    return CountingDelivery(
        body=b"{}",
        delivery_tag=7,
        exchange="shop",
        routing_key="email.send",
        redelivered=False,
        message_id="job-1",
        job_name="email.send",
        headers={"traceparent": PARENT},
    )


class Keep(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


class Peeking(Sampler):
    """Records what it is shown, then samples."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        self.seen = dict(attributes or {})
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "Peeking"


def process_one(sampler: Sampler) -> list[ReadableSpan]:
    kept = Keep()
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(kept)
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[InMemoryMetricReader()]))
    CountingDelivery.reads = 0
    with telemetry.processing(delivery(), "shop.emails") as record:
        record.settled("ack")
    return kept.spans


def test_an_unsampled_delivery_builds_no_span_attributes() -> None:
    assert process_one(ALWAYS_OFF) == []
    assert CountingDelivery.reads == 0


def test_a_recorded_delivery_has_every_attribute_and_its_link() -> None:
    [span] = process_one(ALWAYS_ON)
    attributes: Mapping[str, Any] = span.attributes or {}
    assert attributes["messaging.rabbitmq.message.delivery_tag"] == 7
    assert attributes["messaging.message.id"] == "job-1"
    assert attributes["brokerjobs.job.attempt"] == 1
    assert attributes["messaging.destination.name"] == "shop:email.send:shop.emails"
    assert attributes["brokerjobs.outcome"] == "ack"
    assert [f"{link.context.trace_id:032x}" for link in span.links] == [PARENT.split("-")[1]]
    assert CountingDelivery.reads == 1


def test_a_sampler_that_reads_the_attributes_sees_all_of_them() -> None:
    sampler = Peeking()
    process_one(sampler)
    assert sampler.seen["messaging.message.id"] == "job-1"
    assert sampler.seen["brokerjobs.job.name"] == "email.send"
    assert sampler.seen["messaging.system"] == "rabbitmq"


def send_one(sampler: Sampler) -> list[ReadableSpan]:
    kept = Keep()
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(kept)
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[InMemoryMetricReader()]))
    message = OutgoingMessage(b"{}", "job-2", "email.send", None, {"bj-attempt": 3})
    with telemetry.sending(message, "shop", "email.send"):
        pass
    return kept.spans


def test_send_spans_get_their_attributes_lazily_too() -> None:
    assert send_one(ALWAYS_OFF) == []
    [span] = send_one(ALWAYS_ON)
    attributes: Mapping[str, Any] = span.attributes or {}
    assert attributes["messaging.message.id"] == "job-2"
    assert attributes["brokerjobs.job.attempt"] == 3
    assert attributes["messaging.destination.name"] == "shop:email.send"
    sampler = Peeking()
    send_one(sampler)
    assert sampler.seen["brokerjobs.job.name"] == "email.send"
