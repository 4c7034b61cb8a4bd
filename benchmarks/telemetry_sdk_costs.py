"""What each OpenTelemetry SDK call a delivery needs costs, in a tight loop, next to brokerjobs'
whole per-delivery telemetry hook: the pieces the telemetry targets are bounded by.

    PYTHONPATH=. python benchmarks/telemetry_sdk_costs.py [--calls 20000] [--repeat 7]

No broker: SDK providers as in the telemetry scenario (``bench_otel``: spans dropped by a
processor, metrics into an in-memory reader), the fastest of ``--repeat`` timings of
``--calls`` calls each. ``floor`` is the least instrumentation of one delivery (a bare span and
one duration record with the 3 attributes the messaging conventions require); ``brokerjobs`` is
``Telemetry.processing`` entered, settled and exited for one delivery, with and without a W3C
``traceparent`` header (a recorded span then carries a link). In a running worker every figure
is larger (``telemetry_floor.py`` measures that); the proportions are what this shows.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from bench_otel import SdkTelemetry
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from brokerjobs.envelope import Delivery

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
REQUIRED = {
    "messaging.system": "rabbitmq",
    "messaging.destination.name": "shop.emails",
    "messaging.operation.name": "process",
}
NINE = REQUIRED | {f"brokerjobs.extra.{i}": f"value-{i}" for i in range(6)}
ROOT = Context()


def _delivery(headers: dict[str, object]) -> Delivery:
    return Delivery(
        body=b"{}",
        delivery_tag=1,
        exchange="shop",
        routing_key="email.send",
        redelivered=False,
        message_id="0af7651916cd43dd",
        job_name="email.send",
        headers=headers,
    )


def _calls(sdk: SdkTelemetry) -> dict[str, Callable[[], object]]:
    tracer = sdk.tracer_provider.get_tracer("costs")
    histogram = sdk.meter_provider.get_meter("costs").create_histogram("costs.duration", "s")
    telemetry = sdk.telemetry

    def current_span() -> None:
        span = tracer.start_span("process", context=ROOT)
        otel_context.detach(otel_context.attach(trace.set_span_in_context(span)))
        span.end()

    def hook(headers: dict[str, object]) -> Callable[[], None]:
        delivery = _delivery(headers)

        def deliver() -> None:
            with telemetry.processing(delivery, "shop.emails") as record:
                record.settled("completed")

        return deliver

    return {
        "span, bare": lambda: tracer.start_span("p", context=ROOT).end(),
        "span, 9 attributes": lambda: tracer.start_span(
            "p", context=ROOT, kind=SpanKind.CONSUMER, attributes=NINE
        ).end(),
        "span made current and back": current_span,
        "histogram record, 3 attributes": lambda: histogram.record(0.001, REQUIRED),
        "floor: bare span + histogram record": lambda: (
            tracer.start_span("p", context=ROOT).end(),
            histogram.record(0.001, REQUIRED),
        ),
        "brokerjobs hook, no trace headers": hook({}),
        "brokerjobs hook, traceparent header": hook({"traceparent": TRACEPARENT}),
    }


def main(calls: int, repeat: int) -> None:
    for label, ratio in (("every span recorded", None), ("10% of traces sampled", 0.1)):
        print(f"{label} (SDK TracerProvider + MeterProvider), us per call:")
        for name, call in _calls(SdkTelemetry(ratio)).items():
            best = min(timeit.repeat(call, number=calls, repeat=repeat)) / calls
            print(f"  {name:38} {best * 1e6:6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    main(args.calls, args.repeat)
