"""Metrics from several Telemetry objects in one process (a worker and a publisher, or a
Publisher opened per request) add up on the meter provider they share."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.telemetry import Telemetry


def delivery(tag: int) -> Delivery:
    return Delivery(
        body=b"{}", delivery_tag=tag, exchange="shop", routing_key="email.send", redelivered=False
    )


def totals(reader: InMemoryMetricReader) -> dict[str, float]:
    data = reader.get_metrics_data()
    sums: dict[str, float] = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = metric.data.data_points
                sums[metric.name] = sum(getattr(p, "value", getattr(p, "count", 0)) for p in points)
    return sums


def test_two_telemetry_objects_on_one_meter_provider_add_up() -> None:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    tracer_provider = TracerProvider()
    first = Telemetry(tracer_provider, meter_provider)
    second = Telemetry(tracer_provider, meter_provider)

    for telemetry, count in ((first, 3), (second, 5)):
        for tag in range(count):
            with telemetry.processing(delivery(tag), "shop.emails") as record:
                record.settled("completed")
        message = OutgoingMessage(b"{}", f"m{count}", "email.send", priority=0, headers={})
        with telemetry.sending(message, "shop", "email.send"):
            pass
    first.record_queue("shop.emails", "main", 7, 1)
    second.record_queue("shop.emails.parked", "parked", 2, 0)

    sums = totals(reader)
    assert sums["messaging.client.consumed.messages"] == 8
    assert sums["messaging.process.duration"] == 8  # histogram: the count of measurements
    assert sums["messaging.client.sent.messages"] == 2
    assert sums["brokerjobs.queue.depth"] == 9
    # Collected again: cumulative, not reset.
    assert totals(reader)["messaging.client.consumed.messages"] == 8


def test_separate_meter_providers_keep_separate_counts() -> None:
    readers = [InMemoryMetricReader(), InMemoryMetricReader()]
    telemetries = [Telemetry(TracerProvider(), MeterProvider(metric_readers=[r])) for r in readers]
    for tag in range(2):
        with telemetries[0].processing(delivery(tag), "q") as record:
            record.settled("completed")
    assert totals(readers[0])["messaging.client.consumed.messages"] == 2
    assert "messaging.client.consumed.messages" not in totals(readers[1])


def test_metrics_without_a_tracer_provider_record_every_outcome_and_start_no_span() -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    assert telemetry.metering and not telemetry.tracing

    outcomes = ("completed", "retried", "parked", "completed")
    for tag, outcome in enumerate(outcomes):
        with telemetry.processing(delivery(tag), "shop.emails") as record:
            assert trace.get_current_span() is trace.INVALID_SPAN  # no span made current
            record.settled(outcome, None if outcome == "completed" else "ValueError")

    sums = totals(reader)
    assert sums["messaging.client.consumed.messages"] == 4
    assert sums["messaging.process.duration"] == 4
    assert sums["brokerjobs.jobs.retried"] == 1
    assert sums["brokerjobs.jobs.parked"] == 1
