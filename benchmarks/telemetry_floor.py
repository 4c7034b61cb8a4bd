"""What telemetry costs a running worker, next to the least any OpenTelemetry instrumentation of
a delivery costs there (the SDK floor), in one process, interleaved.

    PYTHONPATH=. python benchmarks/telemetry_floor.py [--jobs 10000] [--rounds 3]

Per round and sampler (every span recorded; 10% of traces), three drains of the same prefilled
jobs by a ``Worker`` with a no-op handler: telemetry off; ``floor``: the same SDK providers but
brokerjobs' per-delivery hook replaced by one bare span (no attributes, no links) started and
ended around the delivery and one histogram record with three attributes; ``brokerjobs``: its
own telemetry. Client CPU time per job is counted from the first handler call to the N-th (so
connecting and declaring are left out), the steadier figure on a shared machine; overhead is
1 - off/on of CPU per job. The floor is what the issue's telemetry targets must be judged
against: a span and a histogram point per delivery are required by the messaging semantic
conventions, and the SDK's own cost for them is most of brokerjobs' overhead.

Needs a RabbitMQ on loopback (``BROKERJOBS_BENCH_URL``, default guest@127.0.0.1:5672); declares
``bjbench.floor.<random>`` and deletes it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from bench_bj import BenchOrder, make_jobs
from bench_otel import SdkTelemetry

from brokerjobs import App, Publisher, Settings, Worker
from brokerjobs.broker import default_broker
from brokerjobs.provision import declare_topology
from brokerjobs.telemetry import Processing, otel

URL = os.environ.get("BROKERJOBS_BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/")
FLOOR_ATTRIBUTES = {
    "messaging.system": "rabbitmq",
    "messaging.destination.name": "queue",
    "messaging.operation.name": "process",
}


class _FloorProcessing(Processing):
    """One bare span and one histogram record per delivery: the floor's hook."""

    __slots__ = ("_histogram", "_span", "_started")

    def __init__(self, span: Any, histogram: Any) -> None:
        super().__init__()
        self._span, self._histogram, self._started = span, histogram, 0.0

    def __enter__(self) -> _FloorProcessing:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._span.end()
        self._histogram.record(time.perf_counter() - self._started, FLOOR_ATTRIBUTES)


def _floor_processing(self: otel.OtelTelemetry, delivery: Any, queue: str) -> Processing:
    span = self._tracer.start_span("process", context=otel._ROOT)
    return _FloorProcessing(span, self._process_duration)


@contextlib.contextmanager
def _hook(kind: str) -> Iterator[None]:
    if kind != "floor":
        yield
        return
    own = otel.OtelTelemetry.processing
    otel.OtelTelemetry.processing = _floor_processing  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        otel.OtelTelemetry.processing = own  # type: ignore[method-assign]


class _Clock:
    """CPU and wall time from the first handled job to the N-th."""

    def __init__(self, jobs: int) -> None:
        self.jobs, self.seen = jobs, 0
        self.cpu = self.wall = 0.0
        self.done = asyncio.Event()

    async def handler(self, _: BenchOrder) -> None:
        self.seen += 1
        if self.seen == 1:
            self.cpu, self.wall = -time.process_time(), -time.perf_counter()
        elif self.seen == self.jobs:
            self.cpu += time.process_time()
            self.wall += time.perf_counter()
            self.done.set()


async def _drain(app: App, settings: Settings, clock: _Clock, telemetry: Any) -> float:
    worker = Worker(app, settings, telemetry=telemetry)
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(120):
            await clock.done.wait()
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
    return clock.cpu / (clock.jobs - 1) * 1e6


async def _one(name: str, settings: Settings, jobs: int, kind: str, ratio: float | None) -> float:
    async with Publisher(settings, exchange=name) as publisher:
        await publisher.publish_many(make_jobs(jobs))
    clock = _Clock(jobs)
    telemetry = None if kind == "off" else SdkTelemetry(ratio).telemetry
    with _hook(kind):
        return await _drain(_app(name, clock), settings, clock, telemetry)


def _app(name: str, clock: _Clock) -> App:
    """The same topology every time; a new App per drain for its handler's clock."""
    app = App(name, exchange=name)
    app.queue(f"{name}.jobs", "bench.#", prefetch=100)
    app.handler(BenchOrder, queue=f"{name}.jobs")(clock.handler)
    return app


async def _cleanup(app: App, settings: Settings) -> None:
    connection = await default_broker(settings).connect("bench cleanup")
    try:
        channel = await connection.channel()
        topology = app.topology()
        for queue in topology.queues:
            await channel.delete_queue(queue.name)
        for exchange in (topology.exchange, *topology.exchanges):
            await channel.delete_exchange(exchange)
    finally:
        await connection.close()


async def main(jobs: int, rounds: int) -> None:
    if urlsplit(URL).hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing a broker that is not on loopback: {URL}")
    settings = Settings(url=URL, prefetch=100, publish_window=1000)
    name = f"bjbench.floor.{uuid.uuid4().hex[:10]}"
    app = _app(name, _Clock(1))
    await declare_topology(app, settings)
    cpu: dict[tuple[str, str], list[float]] = {}
    try:
        for round_ in range(rounds):
            for sampler, ratio in (("all spans", None), ("10% traced", 0.1)):
                for kind in ("off", "floor", "brokerjobs"):
                    us = await _one(name, settings, jobs, kind, ratio)
                    cpu.setdefault((sampler, kind), []).append(us)
                    print(f"round {round_ + 1} {sampler:10} {kind:10} {us:6.1f} us/job", flush=True)
    finally:
        await _cleanup(app, settings)
    print("\nmedian client CPU per job; overhead = 1 - off/on")
    for sampler in ("all spans", "10% traced"):
        off = statistics.median(cpu[sampler, "off"])
        for kind in ("off", "floor", "brokerjobs"):
            on = statistics.median(cpu[sampler, kind])
            print(f"  {sampler:10} {kind:10} {on:6.1f} us/job  overhead {1 - off / on:6.1%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.rounds))
