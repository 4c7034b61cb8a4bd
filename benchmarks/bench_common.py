"""What every benchmark process shares. Standard library only, so that the raw aio-pika child
never imports brokerjobs (or pydantic) and its peak RSS stays its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

RESULT_MARK = "BENCH_RESULT "
JOB_NAME = "bench.order"  # the routing key, and the brokerjobs job name
CONTENT_TYPE = "application/json"
JSON_SEPARATORS = (",", ":")  # compact, as pydantic's to_json: both sides send the same bytes
PARKING_SUFFIX = ".parked"  # brokerjobs' parking queue of main queue Q is Q.parked
RETRY_DELAY_S = 0.05  # the benchmark handler's one retry tier (RetryPolicy(delays=(0.05,)))

Result = dict[str, float]


@dataclass(frozen=True, slots=True)
class ChildConfig:
    """Everything a child process needs; passed as JSON on its command line."""

    url: str
    exchange: str
    queue: str
    jobs: int
    prefetch: int = 100
    window: int = 1000
    rate: float = 200.0
    timeout: float = 60.0
    variant: str = ""  # a task's variant, e.g. "fail" (retry) or "otel" (consume)
    broker_pid: int = 0  # the broker's OS process, whose CPU time a child reads; 0: unknown
    tree: str = ""  # a bj child imports brokerjobs from this checkout; "": the current one

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChildConfig:
        return cls(**json.loads(text))


def job_fields(index: int, sent_at: float | None = None) -> dict[str, Any]:
    """One job's payload: about 100 bytes of JSON. ``sent_at`` is a time.time() stamp."""
    return {
        "order_id": 1_000_000 + index,
        "customer": f"customer-{index % 100_000:05d}@example.com",
        "amount": round(10 + (index * 0.37) % 990, 2),
        "currency": "EUR",
        "sent_at": time.time() if sent_at is None else sent_at,
    }


def encode_fields(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=JSON_SEPARATORS).encode()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Reads VmHWM (the high-water mark of this address space) from /proc. ru_maxrss is not used
    on Linux: it survives fork and exec, so a child would report at least its parent's peak.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, not macOS


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def broker_cpu_s(pid: int) -> float | None:
    """The broker's CPU time so far (user + system, all its threads), or None if unreadable.

    Read from /proc/<pid>/stat, never signalled. Clock-tick resolution (10 ms): fine over the
    second or more of broker CPU a measured phase takes.
    """
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the name in parentheses may contain spaces
    utime, stime = int(fields[11]), int(fields[12])  # stat fields 14 and 15
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Stamp:
    """One moment: wall clock (perf_counter), this process's CPU time, the broker's CPU time."""

    wall: float
    cpu: float
    broker: float | None

    @classmethod
    def take(cls, broker_pid: int) -> Stamp:
        return cls(time.perf_counter(), time.process_time(), broker_cpu_s(broker_pid))


def cpu_per_job(start: Stamp, end: Stamp, jobs: int) -> Result:
    """This process's CPU time (all threads) per job, and the broker's if it could be read.

    Unlike a rate, this process's CPU time barely moves when other processes compete for the
    cores. The broker's also counts whatever else the broker did meanwhile (other clients).
    """
    result = {"cpu_us_per_job": (end.cpu - start.cpu) / jobs * 1e6}
    if start.broker is not None and end.broker is not None:
        result["broker_cpu_us_per_job"] = (end.broker - start.broker) / jobs * 1e6
    return result


def throughput(start: Stamp, end: Stamp, jobs: int) -> Result:
    return {"rate": jobs / (end.wall - start.wall)} | cpu_per_job(start, end, jobs)


@dataclass(slots=True)
class Countdown:
    """Counts handled jobs; ``done`` is set by the handler that completes the count."""

    target: int
    broker_pid: int = 0
    count: int = 0
    first_at: float = 0.0
    end: Stamp | None = None  # when the count completed
    latencies_ms: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def tick(self, sent_at: float | None = None) -> None:
        if sent_at is not None:
            self.latencies_ms.append((time.time() - sent_at) * 1000)
        self.count += 1
        if self.count == 1:
            self.first_at = time.perf_counter()
        if self.count == self.target:
            self.end = Stamp.take(self.broker_pid)
            self.done.set()

    @property
    def ended(self) -> Stamp:
        if self.end is None:
            raise RuntimeError(f"counted {self.count} of {self.target} jobs")
        return self.end

    def throughput(self, start: Stamp) -> Result:
        """From ``start`` to the last tick: rate, start-up time, CPU time per job."""
        startup = {"startup_ms": (self.first_at - start.wall) * 1000}
        return throughput(start, self.ended, self.target) | startup

    def latency(self) -> Result:
        return {
            "p50_ms": percentile(self.latencies_ms, 50),
            "p99_ms": percentile(self.latencies_ms, 99),
        }


async def paced(count: int, rate: float, publish_one: Callable[[int], Awaitable[None]]) -> None:
    """Call ``await publish_one(index)`` ``count`` times on a fixed schedule of ``rate``/s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index in range(count):
        delay = start + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await publish_one(index)
