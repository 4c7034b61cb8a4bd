"""Telemetry for publishers, workers and the replay tool: OpenTelemetry when configured.

OpenTelemetry is imported only when it can matter: providers were passed, or the application
already imported ``opentelemetry`` (a provider can only have been set then). Otherwise every
hook here is a no-op and a worker does not load OpenTelemetry at all.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from brokerjobs.envelope import Delivery, OutgoingMessage

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from brokerjobs.telemetry.otel import OtelTelemetry


class Processing:
    """What happened to one delivery (an ``Outcome`` value), for spans and metrics."""

    __slots__ = ("error_type", "outcome")

    def __init__(self) -> None:
        self.outcome = "completed"
        self.error_type: str | None = None

    def settled(self, outcome: str, error_type: str | None = None) -> None:
        self.outcome = outcome
        self.error_type = error_type


class _Untraced:
    """The processing context when telemetry is off: a plain record, no generator."""

    __slots__ = ()

    def __enter__(self) -> Processing:
        return Processing()

    def __exit__(self, *exc: object) -> None:
        return None


_UNTRACED = _Untraced()


class Telemetry:
    """Tracing and metrics for one worker, publisher or replay tool.

    Uses the providers passed, else OpenTelemetry's global ones; ``Telemetry.off()`` disables.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self._impl: OtelTelemetry | None = None
        self.tracing = self.metering = self.enabled = False
        unconfigured = tracer_provider is None and meter_provider is None
        if unconfigured and "opentelemetry" not in sys.modules:
            return
        from brokerjobs.telemetry.otel import OtelTelemetry

        impl = OtelTelemetry(tracer_provider, meter_provider)
        self.tracing, self.metering, self.enabled = impl.tracing, impl.metering, impl.enabled
        if impl.enabled:
            self._impl = impl

    @classmethod
    def off(cls) -> Telemetry:
        telemetry = cls.__new__(cls)
        telemetry._impl = None
        telemetry.tracing = telemetry.metering = telemetry.enabled = False
        return telemetry

    def sending(
        self,
        message: OutgoingMessage,
        exchange: str,
        routing_key: str,
        *,
        operation: str = "publish",
        links: Mapping[str, Any] | None = None,
    ) -> AbstractContextManager[None]:
        """A PRODUCER span around one confirmed publish; injects its context into the headers."""
        if self._impl is None:
            return nullcontext()
        return self._impl.sending(message, exchange, routing_key, operation=operation, links=links)

    def processing(self, delivery: Delivery, queue: str) -> AbstractContextManager[Processing]:
        """A CONSUMER span around decoding, the handler and settlement of one delivery."""
        if self._impl is None:
            return _UNTRACED
        return self._impl.processing(delivery, queue)

    def record_slow(self, job: str, queue: str) -> None:
        """Count a job still running past its slow-job threshold."""
        if self._impl is not None and self.metering:
            self._impl.record_slow(job, queue)

    def record_queue(self, queue: str, role: str, messages: int, consumers: int) -> None:
        """Feed the queue depth and consumer gauges."""
        if self._impl is not None:
            self._impl.record_queue(queue, role, messages, consumers)


def configure_from_environment(environ: Mapping[str, str]) -> bool:
    """Install OTLP exporters as the global providers when OTEL_EXPORTER_OTLP_ENDPOINT is set.

    Needs the ``otlp`` extra (``pip install brokerjobs[otlp]``). Returns True if configured.
    """
    if not environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    from brokerjobs.telemetry.otlp import configure_otlp

    configure_otlp(environ)
    return True
