"""The machinery of a parking-queue scan: each delivery's verdict, the report an operation
fills, and the settling of verdicts (replay confirmed before its ack, removals acked last).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum

from brokerjobs import envelope as wire
from brokerjobs.archive import Summary
from brokerjobs.broker.base import BrokerChannel as Channel
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.parked import ParkedJob, replay_message
from brokerjobs.telemetry import Telemetry
from brokerjobs.topology import DEFAULT_EXCHANGE

IDLE_TIMEOUT_S = 3.0  # a scan ends early if the broker sends nothing for this long


class Verdict(Enum):
    KEEP = "keep"
    REMOVE = "remove"
    REPLAY = "replay"


@dataclass
class Report:
    """What an operation did; ``kept`` are still parked."""

    scanned: int = 0
    matched: int = 0
    replayed: int = 0
    purged: int = 0
    kept: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    jobs: list[ParkedJob] = field(default_factory=list)
    summary: Summary | None = None  # export: what the file holds; purge: what was purged


@dataclass
class ImportReport:
    """What an import did, by job id: published, skipped (already parked), failed (reason)."""

    published: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


Progress = Callable[[Report, int], None]


class Settler:
    """Carries out verdicts: replay = publish, confirm, then ack; remove = ack; keep = nothing."""

    def __init__(
        self,
        reader: Channel,
        writer: Channel,
        queue: str,
        window: int,
        report: Report,
        telemetry: Telemetry,
    ) -> None:
        self._telemetry = telemetry
        self._reader = reader
        self._writer = writer
        self._queue = queue
        self._slots = asyncio.Semaphore(window)
        self._tasks: set[asyncio.Task[None]] = set()
        self._removals: list[int] = []  # acked in finish(), after the whole scan
        self._report = report
        # Marks this scan's copies (see came_back), carried through retries and parking.
        self._scan = uuid.uuid4().hex

    def came_back(self, job: ParkedJob) -> bool:
        """Whether ``job`` is one of this scan's own replays, parked again before the scan
        ended. Told by a mark, not by the id: two parked jobs may share one (a job duplicated
        by a crash, a producer that reuses ids; the broker's dead letters of jobs published
        without one all read as the id ""), and each original goes back."""
        return job.delivery.headers.get(wire.REPLAY_SCAN) == self._scan

    async def settle(self, delivery: Delivery, job: ParkedJob, verdict: Verdict) -> None:
        if verdict is Verdict.REMOVE:
            self._removals.append(delivery.delivery_tag)
        elif verdict is Verdict.REPLAY:
            message = replay_message(job)
            message.headers[wire.REPLAY_SCAN] = self._scan
            await self._slots.acquire()
            task = asyncio.create_task(self._replay(delivery, job, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replay(self, delivery: Delivery, job: ParkedJob, message: OutgoingMessage) -> None:
        try:
            # Straight to the failing queue only, never through the topic exchange.
            with self._telemetry.sending(
                message,
                DEFAULT_EXCHANGE,
                self._queue,
                operation="replay",
                links=job.delivery.headers,
            ):
                await self._writer.publish(message, DEFAULT_EXCHANGE, self._queue)
            await self._reader.ack(delivery.delivery_tag)
            self._report.replayed += 1
        except Exception as exc:  # whatever fails, the job stays parked and is reported
            self._report.failed.append((job.job_id, str(exc) or type(exc).__name__))
        finally:
            self._slots.release()

    async def finish(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks)
        for tag in self._removals:
            await self._reader.ack(tag)


async def deliveries(channel: Channel, queue: str, total: int) -> AsyncIterator[Delivery]:
    """Up to ``total`` deliveries from ``queue``, unacked; ends early when the queue runs dry."""
    inbox: asyncio.Queue[Delivery] = asyncio.Queue()

    async def receive(delivery: Delivery) -> None:
        inbox.put_nowait(delivery)

    tag = await channel.consume(queue, receive)
    try:
        for _ in range(total):
            if not inbox.empty():
                delivery = inbox.get_nowait()  # no timer, and no task as wait_for makes
            else:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT_S):
                        delivery = await inbox.get()
                except TimeoutError:
                    return
            yield delivery
    finally:
        with contextlib.suppress(Exception):
            await channel.cancel(tag)


class Pacer:
    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self._interval:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self._interval
