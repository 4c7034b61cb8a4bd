"""The scenarios, in table order. Adding one = one decorated function here (plus, if it needs a
new kind of child, a ``TASKS`` entry in bench_raw.py, bench_aiormq.py and/or bench_bj.py).

Each scenario's function prepares the broker, runs one arm once (in a child process via
``bench.run`` or ``bench.child``), checks the broker afterwards and returns ``{metric key:
value}``. It is called once per arm per round (``repeat`` times per round if set), the arms
interleaved and alternating which goes first. The arms and metrics are described in bench_model.
"""

from __future__ import annotations

from bench_common import RETRY_DELAY_S, Result
from bench_model import (
    SCENARIOS,
    Arm,
    Metric,
    Scenario,
    contest,
    difference,
    overhead,
    scenario,
    vs_raw,
)
from bench_parent import Bench, BenchError, Side, middleware_unavailable

__all__ = ["SCENARIOS", "Scenario"]


def _side(arm: str) -> Side:
    """The child module of a raw-vs-brokerjobs arm."""
    if arm == "raw":
        return "raw"
    if arm == "bj":
        return "bj"
    raise BenchError(f"arm {arm!r} is neither raw nor bj")


CLIENT_CPU = Metric("cpu_us_per_job", "  client process CPU time per job", "us", False)
BROKER_CPU = Metric("broker_cpu_us_per_job", "  broker CPU time per job", "us", False)


@scenario(
    "publish",
    Metric("rate", "publish {jobs} jobs, confirmed", "msg/s", True, "publish_ratio"),
    CLIENT_CPU,
    BROKER_CPU,
    arms=contest(
        aiormq="channel.basic_publish(json bytes, properties(delivery_mode 2, content_type, "
        "message_id), mandatory=True) per job, asyncio.gather in windows of 1000, each "
        "confirm checked",
        pika="exchange.publish(Message(json bytes, PERSISTENT, content_type, message_id), "
        "mandatory=True) per job, asyncio.gather in windows of 1000, each confirm checked",
        bj="Publisher.publish_many(@job pydantic models): to_json, message id, headers, "
        "pipelined confirms (publish_window=1000)",
    ),
    subject="bj",
)
async def publish(bench: Bench, arm: str) -> Result:
    queue = bench.place(arm).queue
    await bench.admin.purge(queue)
    result = await bench.run(arm, "publish")
    await bench.admin.expect_depth(bench.base.jobs, f"after {arm} publish", queue)
    await bench.admin.purge(queue)
    return result


@scenario(
    "consume",
    Metric("rate", "drain {jobs} jobs, prefetch {prefetch}", "msg/s", True, "consume_ratio"),
    Metric("startup_ms", "  of which: start to first job", "ms", False),
    Metric("cpu_us_per_job", "  consumer CPU time per job", "us", False),
    BROKER_CPU,
    Metric("rss_mb", "consumer process peak RSS", "MiB", False, "rss_ratio"),
    Metric("import_rss_mb", "  of which: after imports", "MiB", False),
    arms=contest(
        aiormq="basic_consume(cb), manual acks: cb json.loads the body, awaits a no-op "
        "handler, basic_ack(delivery_tag)",
        pika="queue.consume(cb): cb json.loads the body, awaits a no-op handler, message.ack()",
        typed="as pika, but cb validates the body with BenchOrder.model_validate_json (the "
        "pydantic model brokerjobs' arm uses; no brokerjobs import) instead of json.loads",
        bj="Worker + App, one async no-op handler: body validated into the pydantic model, "
        "job context, timeout, ack",
    ),
    subject="bj",
)
async def consume(bench: Bench, arm: str) -> Result:
    return await _drain(bench, arm, arm, "")


async def _drain(bench: Bench, arm: str, place: str, variant: str) -> Result:
    queue = bench.place(place).queue
    await bench.admin.purge(queue)
    await bench.prefill(place, bench.base.jobs)
    result = await bench.run(place, "consume", variant=variant)
    await bench.admin.expect_depth(0, f"after {arm} consume", queue)
    return result


@scenario(
    "latency",
    Metric(
        "p50_ms",
        "publish->handler p50, {latency_jobs} jobs at {rate:g}/s",
        "ms",
        False,
        "latency_p50_ratio",
    ),
    Metric("p99_ms", "publish->handler p99", "ms", False),
    Metric("cpu_us_per_job", "  process CPU time per job (publish + consume)", "us", False),
    arms=contest(
        aiormq="one process: confirmed basic_publish paced at the rate; basic_consume as above",
        pika="one process: confirmed exchange.publish paced at the rate; queue.consume as above",
        bj="one process: Publisher.publish paced at the rate; Worker as above",
    ),
    subject="bj",
)
async def latency(bench: Bench, arm: str) -> Result:
    queue = bench.place(arm).queue
    await bench.admin.purge(queue)
    result = await bench.run(arm, "latency", jobs=bench.latency_jobs)
    await bench.admin.expect_depth(0, f"after {arm} latency", queue)
    return result


@scenario(
    "replay",
    Metric(
        "rate",
        "replay {jobs} parked jobs, confirmed",
        "jobs/s",
        True,
        ratio_name="replay_ratio",
        value_name="replay_rate",
        target=3000,
    ),
    Metric("cpu_us_per_job", "  replaying process CPU time per job", "us", False),
    arms=vs_raw(
        raw="naive move loop: consume <queue>.parked (prefetch 1000), publish each message as "
        "it is to the main queue (default exchange, mandatory), ack once confirmed; pipelined",
        bj="ParkingLot(settings, queue).replay(): one scan holding every parked job unacked, "
        "replay copy (attempt 1, failure headers dropped) published with confirm (window "
        "500), then the parked copy acked. Parked jobs: brokerjobs' own parked envelope "
        "(traceback included), prefilled with confirms",
    ),
)
async def replay(bench: Bench, arm: str) -> Result:
    side = _side(arm)
    admin, jobs = bench.admin, bench.base.jobs
    await admin.purge()
    await admin.purge(admin.parking)
    await admin.prefill_parked(jobs)
    result = await bench.child(side, "replay")
    await admin.expect_depth(0, f"after {side} replay", admin.parking)
    await admin.expect_depth(jobs, f"after {side} replay", admin.main)
    await admin.purge()
    return result


_RETRY_METRICS = (
    Metric("drain_ms", "drain {retry_jobs} jobs (wall time)", "ms", False),
    Metric(
        "per_job_ms",
        "  extra wall time per failed job",
        "ms",
        False,
        value_name="retry_extra_ms",
        derive=difference,
    ),
    Metric("cpu_us_per_job", "  worker CPU time per job", "us", False),
    Metric(
        "hop_p50_ms",
        "  retry hop p50 (2nd start - raise - {delay_ms:g} ms)",
        "ms",
        False,
        value_name="retry_hop_ms",
    ),
    Metric("hop_p99_ms", "  retry hop p99", "ms", False),
    Metric(
        "paced_hop_p50_ms",
        "retry hop p50, {paced_retry_jobs} jobs at {rate:g}/s",
        "ms",
        False,
        value_name="retry_hop_paced_ms",
    ),
    Metric("paced_hop_p99_ms", "retry hop p99, paced", "ms", False),
)
_RETRY_ARMS = (
    Arm("ok", "all succeed", "Worker as above draining the jobs; every job succeeds"),
    Arm(
        "fail",
        "fail once",
        "the same, but each job's first attempt raises: the worker republishes it with "
        f"confirm to the retry tier (RetryPolicy(delays=({RETRY_DELAY_S:g},), "
        "max_attempts=2)), then acks it; the broker dead-letters it back to the main queue "
        f"after {RETRY_DELAY_S * 1000:g} ms and the second attempt succeeds. Hop = second "
        "attempt's start - first attempt's raise - the tier delay, in the handler. Paced: "
        "one process publishing jobs at the rate to a running Worker, each failing once "
        "(no backlog: the hop without queueing)",
    ),
)


@scenario("retry", *_RETRY_METRICS, arms=_RETRY_ARMS)
async def retry(bench: Bench, arm: str) -> Result:
    admin, jobs = bench.admin, bench.retry_jobs
    await admin.purge()
    await bench.prefill("bj", jobs)
    result = await bench.child("bj", "retry", jobs=jobs, variant=arm)
    await _expect_retry_queues_empty(bench, arm)
    if arm == "fail":
        paced = await bench.child("bj", "retry", jobs=bench.paced_retry_jobs, variant="paced")
        await _expect_retry_queues_empty(bench, "paced")
        result |= {f"paced_{key}": value for key, value in paced.items()}
    return result


async def _expect_retry_queues_empty(bench: Bench, variant: str) -> None:
    admin = bench.admin
    for queue in (admin.main, admin.retry_tier, admin.parking):
        await admin.expect_depth(0, f"after the retry run ({variant})", queue)


def _telemetry_metrics(value_name: str, target: float) -> tuple[Metric, ...]:
    return (
        Metric("rate", "drain {jobs} jobs, prefetch {prefetch}", "msg/s", True),
        Metric(
            "rate",
            "  telemetry overhead (1 - on/off)",
            "%",
            False,
            value_name=value_name,
            derive=overhead,
            target=target,
        ),
        Metric("cpu_us_per_job", "  consumer CPU time per job", "us", False),
        Metric("sdk_floor_us", "  SDK floor per job: bare span + 1 histogram record", "us", False),
        Metric("rss_mb", "consumer process peak RSS", "MiB", False),
    )


_TELEMETRY_OFF = Arm(
    "off", "telemetry off", "the consume scenario's Worker, telemetry off (default)"
)


@scenario(
    "telemetry",
    *_telemetry_metrics("telemetry_overhead", 0.20),  # issue 12: every span recorded
    arms=(
        _TELEMETRY_OFF,
        Arm(
            "on",
            "telemetry on",
            "the same Worker with telemetry=Telemetry(tp, mp): an SDK TracerProvider whose "
            "only span processor drops every finished span (spans fully recorded, none "
            "exported) and an SDK MeterProvider with an InMemoryMetricReader",
        ),
    ),
    repeat=2,
)
async def telemetry(bench: Bench, arm: str) -> Result:
    return await _telemetry_run(bench, arm, "otel", sampled=False)


@scenario(
    "sampled",
    *_telemetry_metrics("telemetry_overhead_sampled", 0.10),  # metrics + 10% traced
    arms=(
        _TELEMETRY_OFF,
        Arm(
            "on",
            "on, 10% traced",
            "as telemetry on, but the TracerProvider samples 10% of traces "
            "(ParentBased(TraceIdRatioBased(0.1))); every delivery still measured in metrics",
        ),
    ),
    repeat=2,
)
async def telemetry_sampled(bench: Bench, arm: str) -> Result:
    return await _telemetry_run(bench, arm, "otel-sampled", sampled=True)


async def _telemetry_run(bench: Bench, arm: str, variant: str, *, sampled: bool) -> Result:
    admin, jobs = bench.admin, bench.base.jobs
    await admin.purge()
    await bench.prefill("bj", jobs)
    result = await bench.child("bj", "consume", variant=variant if arm == "on" else "")
    await admin.expect_depth(0, f"after the {variant}-{arm} consume")
    if arm == "on":
        spans_ok = 0 < result["spans"] < jobs if sampled else result["spans"] == jobs
        if not spans_ok or result["consumed_metric"] != jobs:
            raise BenchError(
                f"{variant}: {result['spans']:g} spans and {result['consumed_metric']:g} "
                f"consumed messages counted for {jobs} jobs"
            )
    return result


@scenario(
    "consume-noop-middleware",
    Metric(
        "rate", "drain {jobs} jobs, prefetch {prefetch}", "msg/s", True, "noop_middleware_ratio"
    ),
    Metric("cpu_us_per_job", "  consumer CPU time per job", "us", False),
    Metric("rss_mb", "consumer process peak RSS", "MiB", False),
    arms=(
        Arm(
            "old",
            "baseline, none",
            "the consume scenario's Worker from --baseline REV, without middleware",
            suffix="baseline",
            baseline=True,
        ),
        Arm("bj", "no middleware", "the consume scenario's Worker, no middleware configured"),
        Arm(
            "mw",
            "1 no-op middleware",
            "the same Worker with one middleware that overrides no hook (bench_bj.middleware_api)",
        ),
    ),
    unavailable=middleware_unavailable,
)
async def noop_middleware(bench: Bench, arm: str) -> Result:
    if arm == "mw":
        return await _drain(bench, arm, "bj", "noop-middleware")
    return await _drain(bench, arm, arm, "")
