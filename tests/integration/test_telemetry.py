"""One job's whole story in traces and metrics: publish, process, retry, park, replay, process."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    DataPointT,
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind
from pydantic import BaseModel

from brokerjobs import App, Publisher, RetryPolicy, job
from brokerjobs.parking import ParkingLot
from brokerjobs.telemetry import Telemetry
from brokerjobs.worker import Worker
from tests.support.broker import Broker, make_settings, unique, wait_for


@job("shipment.book")
class BookShipment(BaseModel):
    parcel: str


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[DataPointT]]:
    data = reader.get_metrics_data()
    points: dict[str, list[DataPointT]] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


def total(points: dict[str, list[DataPointT]], name: str, **attributes: str) -> float:
    counts = points.get(name, [])
    assert all(isinstance(p, NumberDataPoint) for p in counts), name
    return sum(
        p.value
        for p in counts
        if isinstance(p, NumberDataPoint)
        and all(attrs_of(p).get(k) == v for k, v in attributes.items())
    )


def attrs_of(item: ReadableSpan | DataPointT) -> Mapping[str, Any]:
    assert item.attributes is not None
    return item.attributes


def context_of(span: ReadableSpan) -> SpanContext:
    context: SpanContext | None = span.context
    assert context is not None
    return context


def parent_of(span: ReadableSpan) -> SpanContext:
    assert span.parent is not None
    return span.parent


async def test_spans_and_metrics_follow_one_job_across_retry_park_and_replay(
    broker: Broker,
) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]))
    app = App(unique("otel"))
    queue = f"{app.name}.shipment.book"
    job_id = await fail_park_and_replay(broker, app, queue, telemetry, exporter)

    # In start order: a publish span ends at its confirm, which may come after the consumer
    # already failed the job and sent its retry.
    spans = sorted(exporter.get_finished_spans(), key=lambda span: span.start_time or 0)
    sends = [s for s in spans if s.kind is SpanKind.PRODUCER]
    processes = [s for s in spans if s.name == f"process {queue}"]
    check_sends(sends, app.exchange, queue)
    for span in [*sends, *processes]:
        assert attrs_of(span)["messaging.system"] == "rabbitmq"
        assert attrs_of(span)["messaging.message.id"] == job_id
        assert attrs_of(span)["brokerjobs.job.name"] == "shipment.book"
    check_processes(processes, app.exchange, queue)
    check_links(sends, processes)
    check_metrics(metric_points(reader))


async def fail_park_and_replay(
    broker: Broker, app: App, queue: str, telemetry: Telemetry, exporter: InMemorySpanExporter
) -> str:
    """One job: fails (retry), fails again (parked), replayed once fixed, then processed."""
    fail = True

    @app.handler(BookShipment, retry=RetryPolicy(delays=(0.1,), max_attempts=2))
    async def book(task: BookShipment) -> None:
        if fail:
            raise TimeoutError("carrier API")

    broker.track(app)
    worker = Worker(app, make_settings(), telemetry=telemetry)
    run = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: worker.ready)
        async with Publisher(make_settings(), exchange=app.exchange, telemetry=telemetry) as pub:
            job_id = await pub.publish(BookShipment(parcel="P-1"))
        await wait_for(lambda: broker.depth_is(f"{queue}.parked", 1), timeout=10)
        fail = False
        async with ParkingLot(make_settings(), queue, telemetry=telemetry) as lot:
            assert (await lot.replay()).replayed == 1
        await wait_for(lambda: len(_named(exporter, f"process {queue}")) == 3)
    finally:
        worker.stop()
        await run
    return job_id


def check_sends(sends: list[ReadableSpan], exchange: str, queue: str) -> None:
    assert [s.name for s in sends] == [
        f"send {exchange}:shipment.book",
        f"send {queue}.retry.100ms",
        f"send {queue}.parked",
        f"send {queue}",
    ]
    assert [attrs_of(s)["messaging.operation.name"] for s in sends] == [
        "publish",
        "retry",
        "park",
        "replay",
    ]
    publish = attrs_of(sends[0])
    assert publish["messaging.destination.name"] == f"{exchange}:shipment.book"
    assert publish["messaging.rabbitmq.destination.routing_key"] == "shipment.book"


def check_processes(processes: list[ReadableSpan], exchange: str, queue: str) -> None:
    first = attrs_of(processes[0])
    assert all(p.kind is SpanKind.CONSUMER for p in processes)
    assert first["messaging.destination.name"] == (f"{exchange}:shipment.book:{queue}")
    assert [attrs_of(p)["brokerjobs.job.attempt"] for p in processes] == [1, 2, 1]
    assert [attrs_of(p)["brokerjobs.outcome"] for p in processes] == [
        "retried",
        "parked",
        "completed",
    ]
    assert first["error.type"] == "builtins.TimeoutError"
    assert "messaging.rabbitmq.message.delivery_tag" in first


def check_links(sends: list[ReadableSpan], processes: list[ReadableSpan]) -> None:
    """Every process span links to what created its message and to the original publish;
    retry and park sends are children of the failing process."""
    publish, retry, park, replay = (context_of(s).span_id for s in sends)
    first, second, third = processes
    assert _linked(first) == {publish}
    assert parent_of(sends[1]).span_id == context_of(first).span_id
    assert _linked(second) == {retry, publish}
    assert parent_of(sends[2]).span_id == context_of(second).span_id
    assert park in _linked(sends[3])
    assert _linked(third) == {replay, publish}
    assert len({context_of(p).trace_id for p in processes}) == 3  # new trace per delivery


def check_metrics(points: dict[str, list[DataPointT]]) -> None:
    assert total(points, "messaging.client.sent.messages") == 4
    assert total(points, "messaging.client.consumed.messages") == 3
    assert (
        total(points, "messaging.client.consumed.messages", **{"brokerjobs.outcome": "completed"})
        == 1
    )
    assert total(points, "brokerjobs.jobs.retried", **{"brokerjobs.job.name": "shipment.book"}) == 1
    assert total(points, "brokerjobs.jobs.parked") == 1
    assert total(points, "brokerjobs.jobs.replayed") == 1
    durations = points["messaging.process.duration"]
    assert all(isinstance(p, HistogramDataPoint) for p in durations)
    assert sum(p.count for p in durations if isinstance(p, HistogramDataPoint)) == 3


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _linked(span: ReadableSpan) -> set[int]:
    return {link.context.span_id for link in span.links}
