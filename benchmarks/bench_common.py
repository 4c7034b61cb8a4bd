"""What every benchmark process shares. Standard library only, so that the raw aio-pika child
never imports brokerjobs (or pydantic) and its peak RSS stays its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
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


@dataclass(slots=True)
class Countdown:
    """Counts handled jobs; ``done`` is set by the handler that completes the count."""

    target: int
    count: int = 0
    first_at: float = 0.0
    done_at: float = 0.0
    cpu_done_at: float = 0.0  # time.process_time() when the count completed
    latencies_ms: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def tick(self, sent_at: float | None = None) -> None:
        now = time.perf_counter()
        if sent_at is not None:
            self.latencies_ms.append((time.time() - sent_at) * 1000)
        self.count += 1
        if self.count == 1:
            self.first_at = now
        if self.count == self.target:
            self.done_at = now
            self.cpu_done_at = time.process_time()
            self.done.set()

    def throughput(self, started: float, cpu_started: float) -> Result:
        """From ``started`` (perf_counter) and ``cpu_started`` (process_time) to the last tick.

        ``cpu_us_per_job`` is this process's CPU time (all threads) per job: unlike the rate,
        barely moved by other processes competing for the cores.
        """
        return {
            "rate": self.target / (self.done_at - started),
            "startup_ms": (self.first_at - started) * 1000,
            "cpu_us_per_job": (self.cpu_done_at - cpu_started) / self.target * 1e6,
        }

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
