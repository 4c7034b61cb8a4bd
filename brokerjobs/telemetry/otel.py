"""OpenTelemetry traces and metrics: with ``__init__``, the only code importing OpenTelemetry.

Follows the messaging semantic conventions (v1.44, RabbitMQ): ``send`` spans are PRODUCER and
inject the W3C context into the message headers; ``process`` spans are CONSUMER, parented to
nothing of ours but *linked* to the context that created the message (and to the original
publish for retries and replays), so one job can be followed across attempts. Retries, parking
and replays are themselves ``send`` spans. Loaded only when telemetry may be on (see
``brokerjobs.telemetry``), so workers without OpenTelemetry never import it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TracerProvider

from brokerjobs import envelope as wire
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.telemetry import Processing

SYSTEM = "rabbitmq"
# Attribute names from the messaging semantic conventions.
A_SYSTEM = "messaging.system"
A_DESTINATION = "messaging.destination.name"
A_OPERATION_TYPE = "messaging.operation.type"
A_OPERATION_NAME = "messaging.operation.name"
A_ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
A_DELIVERY_TAG = "messaging.rabbitmq.message.delivery_tag"
A_MESSAGE_ID = "messaging.message.id"
A_ERROR_TYPE = "error.type"
A_JOB = "brokerjobs.job.name"
A_ATTEMPT = "brokerjobs.job.attempt"
A_OUTCOME = "brokerjobs.outcome"
A_QUEUE = "brokerjobs.queue"
A_ROLE = "brokerjobs.queue.role"


def _is_configured(provider: object, *defaults: str) -> bool:
    return type(provider).__name__ not in defaults


class OtelTelemetry:
    """Spans and metrics through the given (or global) OpenTelemetry providers."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        tracer_provider = tracer_provider or trace.get_tracer_provider()
        meter_provider = meter_provider or metrics.get_meter_provider()
        self.tracing = _is_configured(tracer_provider, "ProxyTracerProvider", "NoOpTracerProvider")
        self.metering = _is_configured(meter_provider, "_ProxyMeterProvider", "NoOpMeterProvider")
        self.enabled = self.tracing or self.metering
        self._tracer = tracer_provider.get_tracer("brokerjobs")
        meter = meter_provider.get_meter("brokerjobs")
        self._sent = meter.create_counter("messaging.client.sent.messages", "{message}")
        self._consumed = meter.create_counter("messaging.client.consumed.messages", "{message}")
        self._process_duration = meter.create_histogram("messaging.process.duration", "s")
        self._operation_duration = meter.create_histogram(
            "messaging.client.operation.duration", "s"
        )
        self._retried = meter.create_counter("brokerjobs.jobs.retried", "{job}")
        self._parked = meter.create_counter("brokerjobs.jobs.parked", "{job}")
        self._replayed = meter.create_counter("brokerjobs.jobs.replayed", "{job}")
        self._depths: dict[tuple[str, str], tuple[int, int]] = {}
        meter.create_observable_gauge("brokerjobs.queue.depth", [self._observe_depth], "{message}")
        meter.create_observable_gauge(
            "brokerjobs.queue.consumers", [self._observe_consumers], "{consumer}"
        )

    # -- sending (publish, retry, park, replay) ----------------------------------------------

    @contextmanager
    def sending(
        self,
        message: OutgoingMessage,
        exchange: str,
        routing_key: str,
        *,
        operation: str = "publish",
        links: Mapping[str, Any] | None = None,
    ) -> Iterator[None]:
        """A PRODUCER span around one confirmed publish; injects its context into the headers."""
        destination = f"{exchange}:{routing_key}" if exchange else routing_key
        attributes: dict[str, Any] = {
            A_SYSTEM: SYSTEM,
            A_DESTINATION: destination,
            A_OPERATION_TYPE: "send",
            A_OPERATION_NAME: operation,
            A_ROUTING_KEY: routing_key,
            A_MESSAGE_ID: message.message_id,
            A_JOB: message.job_name or routing_key,
            A_ATTEMPT: wire.header_int(message.headers, wire.ATTEMPT, 1),
        }
        span_links = _links(links) if links else ()
        started = time.perf_counter()
        error: str | None = None
        with self._tracer.start_as_current_span(
            f"send {destination}", kind=SpanKind.PRODUCER, attributes=attributes, links=span_links
        ) as span:
            if "traceparent" in message.headers:
                message.headers.setdefault(
                    wire.ORIGINAL_TRACEPARENT, message.headers["traceparent"]
                )
            propagate.inject(message.headers)
            try:
                yield
            except Exception as exc:
                error = type(exc).__name__
                span.set_attribute(A_ERROR_TYPE, error)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            finally:
                metric_attributes: dict[str, Any] = {
                    A_SYSTEM: SYSTEM,
                    A_DESTINATION: destination,
                    A_OPERATION_NAME: operation,
                }
                if error:
                    metric_attributes[A_ERROR_TYPE] = error
                self._sent.add(1, metric_attributes)
                self._operation_duration.record(time.perf_counter() - started, metric_attributes)
        if operation == "replay" and error is None:
            self._replayed.add(1, {A_JOB: attributes[A_JOB]})

    # -- processing --------------------------------------------------------------------------

    @contextmanager
    def processing(self, delivery: Delivery, queue: str) -> Iterator[SpanProcessing]:
        """A CONSUMER span around decoding, the handler and settlement of one delivery."""
        destination = f"{delivery.exchange}:{delivery.routing_key}:{queue}"
        job = delivery.job_name or delivery.routing_key
        attributes: dict[str, Any] = {
            A_SYSTEM: SYSTEM,
            A_DESTINATION: destination,
            A_OPERATION_TYPE: "process",
            A_OPERATION_NAME: "process",
            A_ROUTING_KEY: delivery.routing_key,
            A_DELIVERY_TAG: delivery.delivery_tag,
            A_MESSAGE_ID: delivery.message_id or "",
            A_JOB: job,
            A_ATTEMPT: delivery.attempt,
        }
        started = time.perf_counter()
        span = self._tracer.start_span(
            f"process {queue}",
            context=Context(),  # a new trace per delivery, linked to its creator
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=_links(delivery.headers),
        )
        record = SpanProcessing(span)
        try:
            with trace.use_span(span, end_on_exit=True):
                yield record
        finally:
            # After the span is no longer current: metrics then skip exemplar sampling.
            self._record_processed(record, job, queue, time.perf_counter() - started)

    def _record_processed(
        self, record: SpanProcessing, job: str, queue: str, duration: float
    ) -> None:
        metric_attributes: dict[str, Any] = {
            A_SYSTEM: SYSTEM,
            A_DESTINATION: queue,
            A_OPERATION_NAME: "process",
            A_OUTCOME: record.outcome,
        }
        if record.error_type:
            metric_attributes[A_ERROR_TYPE] = record.error_type
        self._consumed.add(1, metric_attributes)
        self._process_duration.record(duration, metric_attributes)
        if record.outcome in ("retry", "park"):
            counter = self._retried if record.outcome == "retry" else self._parked
            counter.add(1, {A_JOB: job, A_QUEUE: queue})

    # -- queue depth gauges (fed by the worker's periodic probe) -----------------------------

    def record_queue(self, queue: str, role: str, messages: int, consumers: int) -> None:
        self._depths[(queue, role)] = (messages, consumers)

    def _observe_depth(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(m, {A_QUEUE: q, A_ROLE: r}) for (q, r), (m, _) in self._depths.items()]

    def _observe_consumers(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(c, {A_QUEUE: q, A_ROLE: r}) for (q, r), (_, c) in self._depths.items()]


class SpanProcessing(Processing):
    """The outcome of one delivery, recorded on its process span too."""

    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        super().__init__()
        self._span = span

    def settled(self, outcome: str, error_type: str | None = None) -> None:
        super().settled(outcome, error_type)
        self._span.set_attribute(A_OUTCOME, outcome)
        if error_type:
            self._span.set_attribute(A_ERROR_TYPE, error_type)
            self._span.set_status(Status(StatusCode.ERROR, error_type))


def _links(headers: Mapping[str, Any]) -> list[Link]:
    """Links to the context that created the message and, if different, the original publish."""
    links: list[Link] = []
    for key, kind in (("traceparent", "creation"), (wire.ORIGINAL_TRACEPARENT, "original")):
        value = headers.get(key)
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str):
            continue
        context = trace.get_current_span(
            propagate.extract({"traceparent": value})
        ).get_span_context()
        if context.is_valid and all(link.context != context for link in links):
            links.append(Link(context, {"brokerjobs.link": kind}))
    return links


def configure_otlp(environ: Mapping[str, str]) -> None:
    """Install OTLP exporters as the global tracer and meter providers."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        from brokerjobs.errors import ConfigError

        raise ConfigError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed: "
            "pip install 'brokerjobs[otlp]'"
        ) from None
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "brokerjobs")})
    tracer_provider = SdkTracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    metrics.set_meter_provider(SdkMeterProvider(resource=resource, metric_readers=[reader]))
