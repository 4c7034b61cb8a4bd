"""Telemetry "on" for the telemetry scenario: OpenTelemetry SDK providers, nothing exported.

Tracing: an SDK ``TracerProvider`` (default sampler: every span recorded) whose only span
processor counts each finished span and drops it. Every span is built in full (attributes,
links, events, status, timing) and nothing is exported, queued or kept, so the figure is the
cost of the instrumentation itself, not of an exporter.
Metrics: an SDK ``MeterProvider`` with an ``InMemoryMetricReader``: every measurement is
aggregated as with a real reader (read once at the end, to check the counts).

With ``sample_ratio`` the tracer provider samples that fraction of new traces
(``ParentBased(TraceIdRatioBased(r))``, a common production setting); metrics are unchanged.

Imported by the brokerjobs child only for this variant, so no other child loads the SDK.
"""

from __future__ import annotations

import time

from bench_common import Result
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from brokerjobs.telemetry import Telemetry

FLOOR_SAMPLES = 3000

CONSUMED_METRIC = "messaging.client.consumed.messages"


class DropSpans(SpanProcessor):
    """Counts finished spans and drops them."""

    def __init__(self) -> None:
        self.ended = 0

    def on_end(self, span: ReadableSpan) -> None:
        self.ended += 1


class SdkTelemetry:
    """The providers, the ``Telemetry`` to pass to the worker, and what they recorded."""

    def __init__(self, sample_ratio: float | None = None) -> None:
        self.sample_ratio = sample_ratio
        self.spans = DropSpans()
        self.tracer_provider = _tracer_provider(sample_ratio)
        self.tracer_provider.add_span_processor(self.spans)
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.telemetry = Telemetry(self.tracer_provider, self.meter_provider)
        if not (self.telemetry.tracing and self.telemetry.metering):
            raise RuntimeError("brokerjobs did not enable tracing and metrics for SDK providers")

    def consumed(self) -> float:
        """The sum of brokerjobs' consumed-messages counter over all its attribute sets."""
        data = self.reader.get_metrics_data()
        total = 0.0
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == CONSUMED_METRIC:
                        total += sum(getattr(p, "value", 0) for p in metric.data.data_points)
        return total

    def floor_us(self) -> float:
        """What the SDK alone costs per job on this machine, in fresh providers of the same
        kind: one bare span started and ended and one histogram record (3 attributes), the least
        any instrumentation of a delivery records. Best of 3 runs."""
        tracer = _tracer_provider(self.sample_ratio).get_tracer("floor")
        meter = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter("floor")
        histogram = meter.create_histogram("floor.duration", "s")
        attributes = {"messaging.system": "rabbitmq", "messaging.destination.name": "q", "x": "y"}
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(FLOOR_SAMPLES):
                tracer.start_span("process q", kind=SpanKind.CONSUMER).end()
                histogram.record(0.001, attributes)
            best = min(best, (time.perf_counter() - started) / FLOOR_SAMPLES)
        return best * 1e6

    def counts(self) -> Result:
        """Spans ended and messages counted (the parent checks them against the jobs)."""
        counts = {"spans": float(self.spans.ended), "consumed_metric": self.consumed()}
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        return counts


def _tracer_provider(sample_ratio: float | None) -> TracerProvider:
    if sample_ratio is None:
        return TracerProvider()  # the SDK default: every root span recorded
    return TracerProvider(sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
