"""brokerjobs doing the benchmark's work through its public API: ``Publisher``, ``Worker`` and
``ParkingLot``.

Publishing: ``Publisher.publish_many`` (pipelined confirms, window ``settings.publish_window``).
Consuming: a ``Worker`` running an ``App`` with one async handler; the worker validates each body
into the pydantic job model, runs the handler, acks. Variants: the handler fails each job's first
attempt (task ``retry``, variant ``fail``), or OpenTelemetry SDK providers are passed (task
``consume``, variant ``otel``, see bench_otel.py).
Replaying: ``ParkingLot(settings, queue).replay()`` of everything parked.
Modules only some tasks need (parking, OpenTelemetry) are imported inside those tasks, so the
consumer's peak RSS is not inflated by them.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench_common import (
    JOB_NAME,
    RETRY_DELAY_S,
    ChildConfig,
    Countdown,
    Result,
    Stamp,
    cpu_per_job,
    job_fields,
    paced,
    peak_rss_mb,
    percentile,
    throughput,
)
from bench_order import BenchOrder

import brokerjobs
from brokerjobs import App, Publisher, RetryPolicy, Settings, Worker, current_job, job
from brokerjobs.telemetry import Telemetry

# The AMQP client loads when a component first connects (``brokerjobs.broker.default_broker``);
# a worker process has it loaded before its first job. Loaded here, as the raw arms load theirs,
# so that neither "start to first job" nor "RSS after imports" compares import order.
try:
    import brokerjobs.broker.amqp
except ImportError:  # a --baseline tree from before the broker package
    import brokerjobs.transport  # type: ignore[import-not-found,unused-ignore]

# One short retry tier; a job failing twice is parked. Only the retry scenario's handler fails.
RETRY = RetryPolicy(delays=(RETRY_DELAY_S,), max_attempts=2)


job(JOB_NAME)(BenchOrder)  # the typed raw arm validates into this same class, undecorated


Handler = Callable[[BenchOrder], Awaitable[None]]


async def _noop(_: BenchOrder) -> None:
    return None


def make_settings(cfg: ChildConfig) -> Settings:
    return Settings(url=cfg.url, prefetch=cfg.prefetch, publish_window=cfg.window)


def middleware_api() -> str | None:
    """How this tree takes a middleware (issue 10's delivery pipeline), or None if it has none.

    Recognised: a ``brokerjobs.Middleware`` base class, configured with ``app.use(m)`` or
    ``App(..., middleware=[m])``. If the pipeline lands with another shape, adapt this function
    and ``_noop_middleware``; the scenario itself needs no change.
    """
    if not isinstance(getattr(brokerjobs, "Middleware", None), type):
        return None
    if callable(getattr(App, "use", None)):
        return "app.use"
    if "middleware" in inspect.signature(App).parameters:
        return "App(middleware=...)"
    return None


_DELIVERY_HOOKS = (
    "received", "decoded", "before_handler", "after_success", "after_failure", "after_settle",
)  # fmt: skip


async def _nothing(self: object, run: object) -> None:
    return None


def _noop_middleware() -> Any:
    """A middleware that overrides every delivery hook with one that does nothing: the cost of
    the pipeline itself (one that overrides nothing is skipped entirely, so costs nothing)."""
    base: type = brokerjobs.Middleware  # type: ignore[attr-defined,unused-ignore]
    return type("NoopMiddleware", (base,), dict.fromkeys(_DELIVERY_HOOKS, _nothing))()


def make_app(cfg: ChildConfig, handler: Handler = _noop, *, middleware: bool = False) -> App:
    """The benchmark app; the parent declares its topology, and both sides use its main queue."""
    api = middleware_api() if middleware else None
    if middleware and api is None:
        raise RuntimeError("no middleware API in this tree")
    extra: dict[str, Any] = {}
    if api == "App(middleware=...)":
        extra["middleware"] = [_noop_middleware()]
    app = App(cfg.exchange, exchange=cfg.exchange, **extra)
    if api == "app.use":
        app.use(_noop_middleware())  # type: ignore[attr-defined,unused-ignore]
    app.queue(cfg.queue, JOB_NAME, prefetch=cfg.prefetch)
    app.handler(BenchOrder, queue=cfg.queue, retry=RETRY)(handler)
    return app


def make_jobs(count: int) -> list[BenchOrder]:
    return [BenchOrder(**job_fields(i)) for i in range(count)]


async def _wait(done: asyncio.Event, worker_task: asyncio.Task[None]) -> None:
    """Wait for ``done``; fail at once if the worker stops first."""
    waiter = asyncio.ensure_future(done.wait())
    try:
        await asyncio.wait({waiter, worker_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not done.is_set():
        worker_task.result()
        raise RuntimeError("the worker stopped before all jobs were handled")


async def _stop(worker: Worker, task: asyncio.Task[None]) -> None:
    worker.stop()
    await asyncio.wait_for(task, 30)


async def _until_ready(worker: Worker, task: asyncio.Task[None]) -> None:
    """Setup only (never inside a timed section): poll until the worker consumes."""
    while not worker.ready:
        if task.done():
            task.result()
            raise RuntimeError("the worker stopped during startup")
        await asyncio.sleep(0.01)


async def publish(cfg: ChildConfig) -> Result:
    jobs = make_jobs(cfg.jobs)
    async with Publisher(make_settings(cfg), exchange=cfg.exchange) as publisher:
        start = Stamp.take(cfg.broker_pid)
        await publisher.publish_many(jobs)
        end = Stamp.take(cfg.broker_pid)
    return throughput(start, end, cfg.jobs)


async def _drain(
    cfg: ChildConfig, handler: Handler, done: asyncio.Event, telemetry: Telemetry | None = None
) -> Stamp:
    """Run a worker until ``done``; returns when it started, before connecting."""
    start = Stamp.take(cfg.broker_pid)
    app = make_app(cfg, handler, middleware=cfg.variant == "noop-middleware")
    worker = Worker(app, make_settings(cfg), telemetry=telemetry)
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(cfg.timeout):
            await _wait(done, task)
    finally:
        await _stop(worker, task)
    return start


async def consume(cfg: ChildConfig) -> Result:
    import_rss = peak_rss_mb()
    countdown = Countdown(cfg.jobs, cfg.broker_pid)

    async def handler(_: BenchOrder) -> None:
        countdown.tick()

    if cfg.variant in ("otel", "otel-sampled"):
        from bench_otel import SdkTelemetry

        # Set up before the clock starts, like the worker's own imports.
        otel = SdkTelemetry(SAMPLED_RATIO if cfg.variant == "otel-sampled" else None)
        start = await _drain(cfg, handler, countdown.done, otel.telemetry)
        checks = otel.counts() | {"sdk_floor_us": otel.floor_us()}
    else:
        start = await _drain(cfg, handler, countdown.done)
        checks = {}
    rss = {"rss_mb": peak_rss_mb(), "import_rss_mb": import_rss}
    return countdown.throughput(start) | rss | checks


SAMPLED_RATIO = 0.1  # the telemetry-sampled scenario's trace sampling ratio


class BenchFailure(Exception):
    """What the retry scenario's handler raises on a job's first attempt."""


async def retry(cfg: ChildConfig) -> Result:
    """Variant ``ok``: drain ``cfg.jobs`` prefilled jobs. ``fail``: the same, but every job's
    first attempt raises. ``paced``: ``cfg.jobs`` jobs published at ``cfg.rate``/s to a running
    worker (no backlog), every first attempt raising.

    A failing attempt notes when it raised; the second attempt's start minus that minus the tier
    delay is the job's hop (settlement, tier, dead-lettering, waiting behind the backlog in the
    main queue, redelivery).
    """
    fail = cfg.variant in ("fail", "paced")
    countdown = Countdown(cfg.jobs)
    failed_at: dict[int, float] = {}
    hops_ms: list[float] = []

    async def handler(order: BenchOrder) -> None:
        now = time.perf_counter()
        if fail:
            if current_job().attempt == 1:
                failed_at[order.order_id] = now
                raise BenchFailure("the first attempt always fails")
            hops_ms.append((now - failed_at.pop(order.order_id) - RETRY_DELAY_S) * 1000)
        countdown.tick()

    if cfg.variant == "paced":
        await _paced_run(cfg, handler, countdown.done)
        result = {}
    else:
        start = await _drain(cfg, handler, countdown.done)
        drain_ms = (countdown.ended.wall - start.wall) * 1000
        result = {"drain_ms": drain_ms, "per_job_ms": drain_ms / cfg.jobs}
        result |= cpu_per_job(start, countdown.ended, cfg.jobs)
    if fail:
        if len(hops_ms) != cfg.jobs or failed_at:
            raise RuntimeError(f"{len(hops_ms)} hops for {cfg.jobs} jobs, {len(failed_at)} lost")
        result |= {"hop_p50_ms": percentile(hops_ms, 50), "hop_p99_ms": percentile(hops_ms, 99)}
    return result


async def replay(cfg: ChildConfig) -> Result:
    """Replay every job parked in ``<queue>.parked``: connect, scan, publish-confirm, ack."""
    from brokerjobs.parking import ParkingLot

    settings = make_settings(cfg)
    start = Stamp.take(0)
    async with ParkingLot(settings, cfg.queue) as lot:
        report = await lot.replay()
        end = Stamp.take(0)
    if report.replayed != cfg.jobs or report.failed or report.invalid:
        raise RuntimeError(
            f"replayed {report.replayed} of {cfg.jobs} (scanned {report.scanned}, "
            f"{len(report.failed)} failed, {len(report.invalid)} invalid; first failures: "
            f"{report.failed[:3]})"
        )
    return throughput(start, end, cfg.jobs)


async def _paced_run(cfg: ChildConfig, handler: Handler, done: asyncio.Event) -> Stamp:
    """One process: a worker, and ``cfg.jobs`` jobs published to it at ``cfg.rate``/s; returns
    when the first publish began."""
    worker = Worker(make_app(cfg, handler), make_settings(cfg))
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(cfg.timeout):
            await _until_ready(worker, task)
            async with Publisher(make_settings(cfg), exchange=cfg.exchange) as publisher:

                async def send(index: int) -> None:
                    await publisher.publish(BenchOrder(**job_fields(index, sent_at=time.time())))

                start = Stamp.take(0)  # no broker CPU: paced, the broker's time is mostly idle
                await paced(cfg.jobs, cfg.rate, send)
                await _wait(done, task)
    finally:
        await _stop(worker, task)
    return start


async def latency(cfg: ChildConfig) -> Result:
    countdown = Countdown(cfg.jobs)

    async def handler(order: BenchOrder) -> None:
        countdown.tick(sent_at=order.sent_at)

    start = await _paced_run(cfg, handler, countdown.done)
    return countdown.latency() | cpu_per_job(start, countdown.ended, cfg.jobs)


async def declare(cfg: ChildConfig) -> Result:
    """Set-up of another tree's contestant: its worker declares its own topology at start."""
    worker = Worker(make_app(cfg), make_settings(cfg))
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(cfg.timeout):
            await _until_ready(worker, task)
    finally:
        await _stop(worker, task)
    return {}


async def prefill(cfg: ChildConfig) -> Result:
    """Set-up, untimed: publish ``cfg.jobs`` jobs as this tree's publisher writes them."""
    async with Publisher(make_settings(cfg), exchange=cfg.exchange) as publisher:
        await publisher.publish_many(make_jobs(cfg.jobs))
    return {}


async def delete(cfg: ChildConfig) -> Result:
    """Clean-up: delete every queue of this tree's plan for the app, and its exchange."""
    import aio_pika

    plan = make_app(cfg).topology()
    async with await aio_pika.connect(cfg.url) as connection:
        channel = await connection.channel()
        for queue in plan.queues:
            await channel.queue_delete(queue.name)
        await channel.exchange_delete(plan.exchange)
    return {"queues": len(plan.queues)}


TASKS: dict[str, Callable[[ChildConfig], Awaitable[Result]]] = {
    "declare": declare,
    "prefill": prefill,
    "delete": delete,
    "publish": publish,
    "consume": consume,
    "latency": latency,
    "retry": retry,
    "replay": replay,
}

__all__ = ["TASKS", "BenchOrder", "make_app", "make_jobs", "make_settings", "middleware_api"]
