"""The scenarios, in table order. Adding one = one decorated function here (plus, if it needs a
new kind of child, a ``TASKS`` entry in bench_raw.py and/or bench_bj.py).

A scenario compares two arms: a baseline (A) and a subject (B), usually raw aio-pika and
brokerjobs, or brokerjobs without and with one feature. Its function prepares the broker, runs
one arm once (usually in a child process via ``bench.child``), checks the broker afterwards and
returns ``{metric key: value}``. It is called once per arm per round (``repeat`` times per round
if set), the arms interleaved and alternating which goes first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench_common import RETRY_DELAY_S, Result
from bench_parent import Bench, BenchError, Side

Measure = Callable[[Bench, str], Awaitable[Result]]
Derive = Callable[[float, float], float]  # (A sample, B sample) of one round -> derived value


@dataclass(frozen=True, slots=True)
class Metric:
    key: str  # key in the arm's result
    label: str  # may use {jobs}, {latency_jobs}, {retry_jobs}, {rate}, {prefetch}, {delay_ms}
    unit: str  # "%": values are fractions, shown as percent
    higher_is_better: bool
    ratio_name: str | None = None  # named B/A ratio of medians in the RESULT line
    value_name: str | None = None  # named B median (or derived median) in the RESULT line
    derive: Derive | None = None  # a row computed from each round's (A, B) pair of `key`
    target: float | None = None  # B's value (or the derived one) should reach this


@dataclass(frozen=True, slots=True)
class Arm:
    key: str  # short name: progress lines, legend, ratio column ("bj/raw")
    title: str  # column title in the table
    does: str  # legend: what this arm does


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    metrics: tuple[Metric, ...]
    arms: tuple[Arm, Arm]  # (A baseline, B subject); ratios are B/A
    measure: Measure
    repeat: int = 1  # runs of each arm per round (more pairs where the effect is small)


SCENARIOS: list[Scenario] = []


def vs_raw(raw: str, bj: str) -> tuple[Arm, Arm]:
    """The usual arms: raw aio-pika (A) against brokerjobs (B)."""
    return Arm("raw", "raw aio-pika", raw), Arm("bj", "brokerjobs", bj)


def scenario(
    name: str, *metrics: Metric, arms: tuple[Arm, Arm], repeat: int = 1
) -> Callable[[Measure], Measure]:
    def register(measure: Measure) -> Measure:
        SCENARIOS.append(Scenario(name, metrics, arms, measure, repeat))
        return measure

    return register


def difference(a: float, b: float) -> float:
    return b - a


def overhead(a: float, b: float) -> float:
    """How much slower B is than A, as a fraction of A's throughput: 1 - B/A."""
    return 1 - b / a


def _side(arm: str) -> Side:
    """The child module of a raw-vs-brokerjobs arm."""
    if arm == "raw":
        return "raw"
    if arm == "bj":
        return "bj"
    raise BenchError(f"arm {arm!r} is neither raw nor bj")


@scenario(
    "publish",
    Metric("rate", "publish {jobs} jobs, confirmed", "msg/s", True, "publish_ratio"),
    arms=vs_raw(
        raw="exchange.publish(Message(json bytes, PERSISTENT, content_type, message_id), "
        "mandatory=True) per job, asyncio.gather in windows of 1000, each confirm checked",
        bj="Publisher.publish_many(@job pydantic models): to_json, message id, headers, "
        "pipelined confirms (publish_window=1000)",
    ),
)
async def publish(bench: Bench, arm: str) -> Result:
    side = _side(arm)
    await bench.admin.purge()
    result = await bench.child(side, "publish")
    await bench.admin.expect_depth(bench.base.jobs, f"after {side} publish")
    await bench.admin.purge()
    return result


@scenario(
    "consume",
    Metric("rate", "drain {jobs} jobs, prefetch {prefetch}", "msg/s", True, "consume_ratio"),
    Metric("startup_ms", "  of which: start to first job", "ms", False),
    Metric("cpu_us_per_job", "  consumer CPU time per job", "us", False),
    Metric("rss_mb", "consumer process peak RSS", "MiB", False, "rss_ratio"),
    Metric("import_rss_mb", "  of which: after imports", "MiB", False),
    arms=vs_raw(
        raw="queue.consume(cb): cb json.loads the body, awaits a no-op handler, message.ack()",
        bj="Worker + App, one async no-op handler: body validated into the pydantic model, "
        "job context, timeout, ack",
    ),
)
async def consume(bench: Bench, arm: str) -> Result:
    side = _side(arm)
    await bench.admin.purge()
    await bench.admin.prefill(side, bench.base.jobs)
    result = await bench.child(side, "consume")
    await bench.admin.expect_depth(0, f"after {side} consume")
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
    arms=vs_raw(
        raw="one process: confirmed exchange.publish paced at the rate; queue.consume as above",
        bj="one process: Publisher.publish paced at the rate; Worker as above",
    ),
)
async def latency(bench: Bench, arm: str) -> Result:
    side = _side(arm)
    await bench.admin.purge()
    result = await bench.child(side, "latency", jobs=bench.latency_jobs)
    await bench.admin.expect_depth(0, f"after {side} latency")
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


@scenario(
    "retry",
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
    arms=(
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
    ),
)
async def retry(bench: Bench, arm: str) -> Result:
    admin, jobs = bench.admin, bench.retry_jobs
    await admin.purge()
    await admin.prefill("bj", jobs)
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


def _telemetry_metrics(value_name: str) -> tuple[Metric, ...]:
    return (
        Metric("rate", "drain {jobs} jobs, prefetch {prefetch}", "msg/s", True),
        Metric(
            "rate",
            "  telemetry overhead (1 - on/off)",
            "%",
            False,
            value_name=value_name,
            derive=overhead,
            target=0.15,
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
    *_telemetry_metrics("telemetry_overhead"),
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
    *_telemetry_metrics("telemetry_overhead_sampled"),
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
    await admin.prefill("bj", jobs)
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
