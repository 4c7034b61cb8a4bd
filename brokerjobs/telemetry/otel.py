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
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import Token
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import (
    SpanKind,
    Status,
    StatusCode,
    TracerProvider,
)

from brokerjobs import envelope as wire
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.telemetry import Processing
from brokerjobs.telemetry.span_data import (
    A_JOB,
    A_ROUTING_KEY,
    DeliveryAttributes,
    SendAttributes,
    links_of,
)

SYSTEM = "rabbitmq"
# Attribute names from the messaging semantic conventions.
A_SYSTEM = "messaging.system"
A_DESTINATION = "messaging.destination.name"
A_OPERATION_TYPE = "messaging.operation.type"
A_OPERATION_NAME = "messaging.operation.name"
A_ERROR_TYPE = "error.type"
A_OUTCOME = "brokerjobs.outcome"
A_QUEUE = "brokerjobs.queue"
A_ROLE = "brokerjobs.queue.role"
_CACHE_LIMIT = 1024
_Shape = tuple[str, dict[str, Any]]  # a process span's name, its route's attributes


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
        tallies = _tallies_for(meter_provider, meter)
        self._sent = tallies.sent
        self._consumed = tallies.consumed
        self._depths = tallies.depths
        self._process_duration = meter.create_histogram("messaging.process.duration", "s")
        self._operation_duration = meter.create_histogram(
            "messaging.client.operation.duration", "s"
        )
        self._retried = meter.create_counter("brokerjobs.jobs.retried", "{job}")
        self._parked = meter.create_counter("brokerjobs.jobs.parked", "{job}")
        self._replayed = meter.create_counter("brokerjobs.jobs.replayed", "{job}")
        self._slow = meter.create_counter("brokerjobs.jobs.slow", "{job}")
        # Per route and per (queue, error): what every delivery would otherwise rebuild.
        self._routes: dict[tuple[str, str, str], _Shape] = {}
        self._process_metric: dict[tuple[str, str | None], dict[str, Any]] = {}
        self._send_routes: dict[tuple[str, str, str], _Shape] = {}
        self._send_metrics: dict[tuple[str, str, str | None], dict[str, Any]] = {}

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
        shape = self._send_routes.get((exchange, routing_key, operation))
        shape = shape or self._send_shape(exchange, routing_key, operation)
        attributes = SendAttributes(message, shape[1])
        destination = shape[1][A_DESTINATION]
        started = time.perf_counter()
        error: str | None = None
        with self._tracer.start_as_current_span(
            shape[0], kind=SpanKind.PRODUCER, attributes=attributes, links=links_of(links)
        ) as span:
            _inject(message.headers)
            try:
                yield
            except Exception as exc:
                error = type(exc).__name__
                span.set_attribute(A_ERROR_TYPE, error)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            finally:
                self._sent[(destination, operation, error)] += 1
                self._operation_duration.record(
                    time.perf_counter() - started, self._send_metric(destination, operation, error)
                )
        if operation == "replay" and error is None:
            self._replayed.add(1, {A_JOB: attributes[A_JOB]})

    def _send_shape(self, exchange: str, routing_key: str, operation: str) -> _Shape:
        destination = f"{exchange}:{routing_key}" if exchange else routing_key
        attributes = {
            A_SYSTEM: SYSTEM,
            A_DESTINATION: destination,
            A_OPERATION_TYPE: "send",
            A_OPERATION_NAME: operation,
            A_ROUTING_KEY: routing_key,
        }
        if len(self._send_routes) >= _CACHE_LIMIT:
            self._send_routes.clear()
        shape = self._send_routes[exchange, routing_key, operation] = (
            f"send {destination}",
            attributes,
        )
        return shape

    def _send_metric(self, destination: str, operation: str, error: str | None) -> dict[str, Any]:
        key = (destination, operation, error)
        attributes = self._send_metrics.get(key)
        if attributes is None:
            if len(self._send_metrics) >= _CACHE_LIMIT:
                self._send_metrics.clear()
            attributes = self._send_metrics[key] = _metric_attributes(*key)
        return attributes

    # -- processing --------------------------------------------------------------------------

    def processing(self, delivery: Delivery, queue: str) -> MeteredProcessing:
        """A CONSUMER span around decoding, the handler and settlement of one delivery.

        Its attributes and links are built when first read: by the SDK for a span it records
        (or a sampler that reads them), never for an unsampled delivery. Without a tracer
        provider only the metrics are kept: no span, no context switch.
        """
        job = delivery.job_name or delivery.routing_key
        if not self.tracing:
            return MeteredProcessing(self, job, queue)
        route = (delivery.exchange, delivery.routing_key, queue)
        shape = self._routes.get(route)
        if shape is None:
            shape = self._route_shape(*route)
        span = self._tracer.start_span(
            shape[0],
            context=_ROOT,  # a new trace per delivery, linked to its creator
            kind=SpanKind.CONSUMER,
            attributes=DeliveryAttributes(delivery, job, shape[1]),
            links=links_of(delivery.headers),
        )
        return SpanProcessing(self, span, span.is_recording(), job, queue)

    def _route_shape(self, exchange: str, routing_key: str, queue: str) -> _Shape:
        attributes = {
            A_SYSTEM: SYSTEM,
            A_DESTINATION: f"{exchange}:{routing_key}:{queue}",
            A_OPERATION_TYPE: "process",
            A_OPERATION_NAME: "process",
            A_ROUTING_KEY: routing_key,
        }
        if len(self._routes) >= _CACHE_LIMIT:
            self._routes.clear()
        shape = self._routes[exchange, routing_key, queue] = (f"process {queue}", attributes)
        return shape

    def record_processed(
        self, queue: str, job: str, outcome: str, error_type: str | None, duration: float
    ) -> None:
        self._consumed[queue, outcome, error_type] += 1
        attributes = self._process_metric.get((queue, error_type))
        if attributes is None:
            if len(self._process_metric) >= _CACHE_LIMIT:
                self._process_metric.clear()
            attributes = _metric_attributes(queue, "process", error_type)
            self._process_metric[queue, error_type] = attributes
        self._process_duration.record(duration, attributes)
        if outcome in ("retried", "parked"):
            counter = self._retried if outcome == "retried" else self._parked
            counter.add(1, {A_JOB: job, A_QUEUE: queue})

    def record_slow(self, job: str, queue: str) -> None:
        self._slow.add(1, {A_JOB: job, A_QUEUE: queue})

    # -- queue depth gauges (fed by the worker's periodic probe) -----------------------------

    def record_queue(self, queue: str, role: str, messages: int, consumers: int) -> None:
        self._depths[(queue, role)] = (messages, consumers)


class _Tallies:
    """What the observable instruments report, shared by every ``OtelTelemetry`` on one meter
    provider: OpenTelemetry keeps the first instrument registered under a name, with its
    callbacks, and ignores the callbacks of later registrations.

    The two per-message counters are tallied here and observed at collection: a Counter.add
    per message cost as much as the rest of a delivery's metrics.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        self.sent: Counter[tuple[str, str, str | None]] = Counter()
        self.consumed: Counter[tuple[str, str, str | None]] = Counter()
        self.depths: dict[tuple[str, str], tuple[int, int]] = {}
        meter.create_observable_counter(
            "messaging.client.sent.messages", [self._observe_sent], "{message}"
        )
        meter.create_observable_counter(
            "messaging.client.consumed.messages", [self._observe_consumed], "{message}"
        )
        meter.create_observable_gauge("brokerjobs.queue.depth", [self._observe_depth], "{message}")
        meter.create_observable_gauge(
            "brokerjobs.queue.consumers", [self._observe_consumers], "{consumer}"
        )

    def _observe_sent(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(n, _metric_attributes(*key)) for key, n in list(self.sent.items())]

    def _observe_consumed(self, options: CallbackOptions) -> list[Observation]:
        return [
            Observation(n, _metric_attributes(queue, "process", error, outcome))
            for (queue, outcome, error), n in list(self.consumed.items())
        ]

    def _observe_depth(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(m, {A_QUEUE: q, A_ROLE: r}) for (q, r), (m, _) in self.depths.items()]

    def _observe_consumers(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(c, {A_QUEUE: q, A_ROLE: r}) for (q, r), (_, c) in self.depths.items()]


_TALLIES: weakref.WeakKeyDictionary[MeterProvider, _Tallies] = weakref.WeakKeyDictionary()


def _tallies_for(provider: MeterProvider, meter: metrics.Meter) -> _Tallies:
    tallies = _TALLIES.get(provider)
    if tallies is None:
        tallies = _TALLIES[provider] = _Tallies(meter)
    return tallies


class MeteredProcessing(Processing):
    """One delivery's duration and outcome, recorded when it is settled (metrics only).

    A plain context manager rather than a generator: this runs per delivery.
    """

    __slots__ = ("_job", "_queue", "_started", "_telemetry")

    def __init__(self, telemetry: OtelTelemetry, job: str, queue: str) -> None:
        self.outcome = "completed"
        self.error_type = None
        self._telemetry = telemetry
        self._job = job
        self._queue = queue
        self._started = 0.0

    def __enter__(self) -> MeteredProcessing:
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._record()

    def _record(self) -> None:
        self._telemetry.record_processed(
            self._queue,
            self._job,
            self.outcome,
            self.error_type,
            time.perf_counter() - self._started,
        )


class SpanProcessing(MeteredProcessing):
    """The process span of one delivery while it is current, and the outcome it records.

    An unsampled span is still made current, so spans the handler starts are unsampled too.
    """

    __slots__ = ("_recording", "_span", "_token")

    def __init__(
        self, telemetry: OtelTelemetry, span: trace.Span, recording: bool, job: str, queue: str
    ) -> None:
        super().__init__(telemetry, job, queue)
        self._span = span
        self._recording = recording
        self._token: Token[Context] | None = None

    def __enter__(self) -> SpanProcessing:
        self._started = time.perf_counter()
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
        if self._recording:
            if isinstance(exc, Exception):  # not CancelledError and other BaseExceptions
                self._span.record_exception(exc)
                self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            self._span.end()
        self._record()  # after the span is no longer current: metrics skip exemplar sampling

    def settled(self, outcome: str, error_type: str | None = None) -> None:
        self.outcome = outcome
        self.error_type = error_type
        if not self._recording:
            return
        self._span.set_attribute(A_OUTCOME, outcome)
        if error_type:
            self._span.set_attribute(A_ERROR_TYPE, error_type)
            self._span.set_status(Status(StatusCode.ERROR, error_type))


_ROOT = Context()


def _metric_attributes(
    destination: str, operation: str, error: str | None, outcome: str | None = None
) -> dict[str, Any]:
    """A metric point's attributes: the convention's, plus the outcome where one is given (each
    attribute costs on every delivery, so the duration histogram goes without)."""
    attributes = {A_SYSTEM: SYSTEM, A_DESTINATION: destination, A_OPERATION_NAME: operation}
    if outcome is not None:
        attributes[A_OUTCOME] = outcome
    if error:
        attributes[A_ERROR_TYPE] = error
    return attributes


def _inject(headers: dict[str, Any]) -> None:
    """This span's context into the headers; a copy's first trace context is kept aside."""
    if "traceparent" in headers:
        headers.setdefault(wire.ORIGINAL_TRACEPARENT, headers["traceparent"])
    propagate.inject(headers)
