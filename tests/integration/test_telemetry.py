"""One job's whole story in traces and metrics: publish, process, retry, park, replay, process."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import BaseModel

from brokerjobs import App, Publisher, RetryPolicy, job
from brokerjobs.parking import ParkingLot
from brokerjobs.telemetry import Telemetry
from brokerjobs.worker import Worker
from tests.support.broker import Broker, make_settings, unique, wait_for


@job("shipment.book")
class BookShipment(BaseModel):
    parcel: str


def metric_points(reader: InMemoryMetricReader) -> dict[str, list]:
    data = reader.get_metrics_data()
    points: dict[str, list] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


def total(points: dict[str, list], name: str, **attributes: str) -> float:
    return sum(
        p.value
        for p in points.get(name, [])
        if all(p.attributes.get(k) == v for k, v in attributes.items())
    )


async def test_spans_and_metrics_follow_one_job_across_retry_park_and_replay(broker: Broker):
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]))

    app = App(unique("otel"))
    queue = f"{app.name}.shipment.book"
    fail = True

    @app.handler(BookShipment, retry=RetryPolicy(delays=(0.1,), max_attempts=2))
    async def book(task: BookShipment) -> None:
        if fail:
            raise TimeoutError("carrier API")

    broker.track(app)
    worker = Worker(app, make_settings(), telemetry=telemetry)
    import asyncio

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

    spans = exporter.get_finished_spans()
    sends = [s for s in spans if s.kind is SpanKind.PRODUCER]
    processes = _named(exporter, f"process {queue}")
    assert [s.name for s in sends] == [
        f"send {app.exchange}:shipment.book",
        f"send {queue}.retry.100ms",
        f"send {queue}.parked",
        f"send {queue}",
    ]
    assert [s.attributes["messaging.operation.name"] for s in sends] == [
        "publish",
        "retry",
        "park",
        "replay",
    ]
    publish, retry, park, replay = sends
    for span in [*sends, *processes]:
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.message.id"] == job_id
        assert span.attributes["brokerjobs.job.name"] == "shipment.book"
    assert publish.attributes["messaging.destination.name"] == f"{app.exchange}:shipment.book"
    assert publish.attributes["messaging.rabbitmq.destination.routing_key"] == "shipment.book"

    first, second, third = processes
    assert all(p.kind is SpanKind.CONSUMER for p in processes)
    assert first.attributes["messaging.destination.name"] == (
        f"{app.exchange}:shipment.book:{queue}"
    )
    assert [p.attributes["brokerjobs.job.attempt"] for p in processes] == [1, 2, 1]
    assert [p.attributes["brokerjobs.outcome"] for p in processes] == [
        "retried",
        "parked",
        "completed",
    ]
    assert first.attributes["error.type"] == "builtins.TimeoutError"
    assert "messaging.rabbitmq.message.delivery_tag" in first.attributes

    # The links tell the story: every process span links to what created its message and
    # to the original publish; retry and park sends are children of the failing process.
    assert _linked(first) == {publish.context.span_id}
    assert retry.parent.span_id == first.context.span_id
    assert _linked(second) == {retry.context.span_id, publish.context.span_id}
    assert park.parent.span_id == second.context.span_id
    assert park.context.span_id in _linked(replay)
    assert _linked(third) == {replay.context.span_id, publish.context.span_id}
    assert len({p.context.trace_id for p in processes}) == 3  # new trace per delivery

    points = metric_points(reader)
    assert total(points, "messaging.client.sent.messages") == 4
    assert total(points, "messaging.client.consumed.messages") == 3
    assert total(points, "messaging.client.consumed.messages", **{"brokerjobs.outcome": "completed"}) == 1
    assert total(points, "brokerjobs.jobs.retried", **{"brokerjobs.job.name": "shipment.book"}) == 1
    assert total(points, "brokerjobs.jobs.parked") == 1
    assert total(points, "brokerjobs.jobs.replayed") == 1
    durations = points["messaging.process.duration"]
    assert sum(p.count for p in durations) == 3


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _linked(span: ReadableSpan) -> set[int]:
    return {link.context.span_id for link in span.links}
