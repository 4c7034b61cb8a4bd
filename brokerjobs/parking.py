"""Parked jobs: inspect, replay, purge, export and import them without ever losing one.

Every operation scans the parking queue once, holding each message unacked while it decides.
A replayed message is published with a confirm *before* its parked copy is acked; a message
that is not selected stays unacked and returns to its place when the scan's channel closes.
A crash at any point therefore leaves each job parked, replayed, or (rarely) both. A purge acks
nothing before its scan has ended, so it removes all it matched or (killed, or its expectation
not met) none. Export and import go through ``archive``: verified files, re-runnable imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from brokerjobs import envelope as wire
from brokerjobs.archive import Digest, Summary, read_export, record_line, write_export
from brokerjobs.broker import default_broker
from brokerjobs.broker.base import Broker
from brokerjobs.broker.base import BrokerChannel as Channel
from brokerjobs.broker.base import BrokerConnection as Connection
from brokerjobs.envelope import Decoded, Delivery, OutgoingMessage, decode
from brokerjobs.errors import ParkingError, TopologyError
from brokerjobs.jobs import JobSpec
from brokerjobs.settings import Settings
from brokerjobs.telemetry import Telemetry
from brokerjobs.topology import DEFAULT_EXCHANGE, parking_queue_name

IDLE_TIMEOUT_S = 3.0  # a scan ends early if the broker sends nothing for this long
_FAILURE_HEADERS = (
    wire.ERROR_TYPE, wire.ERROR_MESSAGE, wire.ERROR_TRACEBACK, wire.PARK_REASON,
    wire.PARKED_AT, wire.LAST_FAILED_AT, wire.WORKER,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ParkedJob:
    """A parked message with its failure envelope read out."""

    delivery: Delivery

    @property
    def job_id(self) -> str:
        return self.delivery.message_id or ""

    @property
    def job_name(self) -> str:
        return self.delivery.job_name or str(
            self.delivery.headers.get(wire.ORIGIN_ROUTING_KEY, "?")
        )

    @property
    def error(self) -> str:
        headers = self.delivery.headers
        if wire.PARK_REASON in headers:
            return str(headers[wire.PARK_REASON])
        death = _first_death(headers)
        if death:
            return f"dead-lettered by the broker: {death.get('reason', '?')}"
        return "unknown (no failure envelope)"

    @property
    def error_type(self) -> str:
        return str(self.delivery.headers.get(wire.ERROR_TYPE, "broker"))

    @property
    def attempts(self) -> int:
        return self.delivery.attempt

    @property
    def replays(self) -> int:
        return wire.header_int(self.delivery.headers, wire.REPLAYS, 0)

    @property
    def parked_at(self) -> datetime | None:
        value = self.delivery.headers.get(wire.PARKED_AT)
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value)
        death_time = (_first_death(self.delivery.headers) or {}).get("time")
        if isinstance(death_time, datetime):
            return death_time.replace(tzinfo=death_time.tzinfo or UTC)
        return None

    def summary(self) -> dict[str, Any]:
        parked_at = self.parked_at
        return {
            "id": self.job_id,
            "job": self.job_name,
            "error": self.error,
            "error_type": self.error_type,
            "attempts": self.attempts,
            "replays": self.replays,
            "parked_at": parked_at.isoformat() if parked_at else None,
        }


def _first_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which parked jobs an operation applies to; empty fields match everything."""

    ids: frozenset[str] = frozenset()
    job_names: frozenset[str] = frozenset()
    error_contains: str | None = None
    error_regex: re.Pattern[str] | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    limit: int | None = None

    def matches(self, job: ParkedJob, now: datetime) -> bool:
        if self.ids and job.job_id not in self.ids:
            return False
        if self.job_names and job.job_name not in self.job_names:
            return False
        text = f"{job.error_type}: {job.error}"
        if self.error_contains and self.error_contains.lower() not in text.lower():
            return False
        if self.error_regex and not self.error_regex.search(text):
            return False
        return self._age_matches(job, now)

    def _age_matches(self, job: ParkedJob, now: datetime) -> bool:
        if self.older_than is None and self.newer_than is None:
            return True
        parked_at = job.parked_at
        if parked_at is None:
            return False
        age = now - parked_at
        if self.older_than is not None and age < self.older_than:
            return False
        return not (self.newer_than is not None and age > self.newer_than)


EVERYTHING = Selection()


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


def replay_message(job: ParkedJob) -> OutgoingMessage:
    """The copy that goes back to work: attempt 1, one more replay, no broker death headers."""
    source = job.delivery
    drop = set(wire.BROKER_DEATH_HEADERS) | set(_FAILURE_HEADERS)
    headers = {k: v for k, v in source.headers.items() if k not in drop}
    headers[wire.ATTEMPT] = 1
    headers[wire.REPLAYS] = job.replays + 1
    if "traceparent" in source.headers:
        headers.setdefault(wire.ORIGINAL_TRACEPARENT, source.headers["traceparent"])
    return wire.copy_of(source, headers)


class ParkingLot:
    """The parked jobs of one main queue.

    >>> async with ParkingLot(settings, "shop.emails") as lot:
    ...     report = await lot.replay(Selection(job_names=frozenset({"email.send"})))
    """

    def __init__(
        self,
        settings: Settings,
        queue: str,
        *,
        window: int = 500,
        telemetry: Telemetry | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker or default_broker(settings)
        self.telemetry = telemetry or Telemetry()
        self.queue = queue.removesuffix(".parked")
        self.parking_queue = parking_queue_name(self.queue)
        self._window = window
        self._connection: Connection | None = None

    async def __aenter__(self) -> ParkingLot:
        self._connection = await self.broker.connect("parking")
        try:
            await self._check_queues()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            raise ParkingError("use `async with ParkingLot(...)` to connect first")
        return self._connection

    async def _check_queues(self) -> None:
        for name in (self.parking_queue, self.queue):
            channel = await self.connection.channel(confirms=False)
            try:
                await channel.inspect_queue(name)
            except TopologyError:
                raise ParkingError(
                    f"queue {name!r} does not exist: check the queue name "
                    "(`brokerjobs topology show MODULE:APP` lists them)"
                ) from None
            finally:
                await channel.close()

    async def depth(self) -> int:
        channel = await self.connection.channel(confirms=False)
        try:
            return (await channel.inspect_queue(self.parking_queue)).messages
        finally:
            await channel.close()

    # -- operations ------------------------------------------------------------------------

    async def list(self, selection: Selection = EVERYTHING) -> Report:
        """Matching parked jobs, in queue order; nothing is moved."""
        report = Report()

        async def visit(job: ParkedJob) -> Verdict:
            report.jobs.append(job)
            return Verdict.KEEP

        await self._scan(selection, report, visit)
        return report

    async def purge(
        self,
        selection: Selection = EVERYTHING,
        *,
        expect: Summary | None = None,
        expect_count: int | None = None,
    ) -> Report:
        """Delete the matching jobs, all or none: their acks are sent only after the whole scan,
        and only if the matched jobs are exactly ``expect`` (the count and checksum an export
        printed) or ``expect_count`` many; otherwise ParkingError and nothing is deleted."""
        report = Report()
        digest = Digest()

        async def visit(job: ParkedJob) -> Verdict:
            if expect is not None:
                digest.add(record_line(job.delivery))
            report.purged += 1
            return Verdict.REMOVE

        def gate() -> None:
            found = digest.summary() if expect is not None else None
            if expect_count is not None and report.purged != expect_count:
                raise ParkingError(_refusal(f"{report.purged} job(s)", f"{expect_count}"))
            if expect is not None and found != expect:
                raise ParkingError(
                    _refusal(f"{digest.count} job(s), sha256 {digest.summary().sha256}",
                             f"{expect.count} job(s), sha256 {expect.sha256}")
                )  # fmt: skip
            report.summary = found

        try:
            await self._scan(selection, report, visit, gate=gate)
        except ParkingError:
            report.purged = 0
            raise
        return report

    async def replay(
        self,
        selection: Selection = EVERYTHING,
        *,
        dry_run: bool = False,
        rate: float | None = None,
        validate: Mapping[str, JobSpec] | None = None,
        progress: Progress | None = None,
    ) -> Report:
        """Send matching jobs back to their queue; each is confirmed before its parked copy goes.

        ``validate`` (job name -> spec) keeps jobs whose payload would fail again parked.
        """
        report = Report()
        pace = _Pacer(rate)

        async def visit(job: ParkedJob) -> Verdict:
            if validate is not None:
                result = decode(job.delivery, validate, self.settings.max_body_bytes)
                if not isinstance(result, Decoded):
                    report.invalid.append((job.job_id, result.reason))
                    return Verdict.KEEP
            report.jobs.append(job)
            if dry_run:
                return Verdict.KEEP
            await pace.wait()
            return Verdict.REPLAY

        await self._scan(selection, report, visit, progress)
        return report

    async def export(self, path: Path, selection: Selection = EVERYTHING) -> Report:
        """Write matching jobs to an export file, all or nothing (``archive.write_export``);
        nothing is moved. ``report.summary`` is the file's count and checksum."""
        report = await self.list(selection)
        report.summary = write_export(path, (job.delivery for job in report.jobs))
        return report

    async def import_(self, path: Path) -> ImportReport:
        """Publish the records of an export file into this parking queue, confirmed.

        The whole file is verified first (format, count, checksum). Records whose job id is
        already in the parking queue are skipped, so an import that failed midway can simply
        be run again. Each record is published as ``envelope.copy_of`` would copy it.
        """
        deliveries, _ = read_export(path)
        present = {job.job_id for job in (await self.list()).jobs}
        report = ImportReport()
        todo = []
        for delivery in deliveries:
            if delivery.message_id and delivery.message_id in present:
                report.skipped.append(delivery.message_id)
            else:
                todo.append(wire.copy_of(delivery, dict(delivery.headers)))
        channel = await self.connection.channel(confirms=True)
        try:
            failed = await channel.publish_many(
                ((m, DEFAULT_EXCHANGE, self.parking_queue) for m in todo), self._window
            )
        finally:
            await channel.close()
        reasons = {message.message_id: str(exc) for message, exc in failed}
        report.failed = list(reasons.items())
        report.published = [m.message_id for m in todo if m.message_id not in reasons]
        return report

    # -- the one scan ------------------------------------------------------------------------

    async def _scan(
        self,
        selection: Selection,
        report: Report,
        visit: Callable[[ParkedJob], Awaitable[Verdict]],
        progress: Progress | None = None,
        gate: Callable[[], None] | None = None,
    ) -> None:
        """``gate`` runs after the scan, before any removal is acked; raising keeps them all."""
        total = await self.depth()
        if total == 0:
            if gate is not None:
                gate()
            return
        now = datetime.now(UTC)
        reader = await self.connection.channel(confirms=False)  # no prefetch: hold them all
        writer = await self.connection.channel(confirms=True)
        settling = _Settler(reader, writer, self.queue, self._window, report, self.telemetry)
        seen_replayed: set[str] = set()
        try:
            async for delivery in _deliveries(reader, self.parking_queue, total):
                job = ParkedJob(delivery)
                report.scanned += 1
                if job.job_id in seen_replayed:
                    continue  # our own replay came back already: leave it for a later run
                if self._selected(selection, job, now, report):
                    verdict = await visit(job)
                    if verdict is Verdict.REPLAY:
                        seen_replayed.add(job.job_id)
                    await settling.settle(delivery, job, verdict)
                if progress is not None:
                    progress(report, total)
            if gate is not None:
                gate()
            await settling.finish()
        finally:
            report.kept = report.scanned - report.replayed - report.purged
            await reader.close()  # unacked (kept) messages go back to the parking queue
            await writer.close()

    @staticmethod
    def _selected(selection: Selection, job: ParkedJob, now: datetime, report: Report) -> bool:
        if selection.limit is not None and report.matched >= selection.limit:
            return False
        if not selection.matches(job, now):
            return False
        report.matched += 1
        return True


def _refusal(found: str, expected: str) -> str:
    return (
        f"refusing to purge: the parking queue matches {found}, the export had {expected}; "
        "nothing was purged. Export again (and keep that file) before purging."
    )


class _Settler:
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

    async def settle(self, delivery: Delivery, job: ParkedJob, verdict: Verdict) -> None:
        if verdict is Verdict.REMOVE:
            self._removals.append(delivery.delivery_tag)
        elif verdict is Verdict.REPLAY:
            await self._slots.acquire()
            task = asyncio.create_task(self._replay(delivery, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replay(self, delivery: Delivery, job: ParkedJob) -> None:
        try:
            # Straight to the failing queue only, never through the topic exchange.
            message = replay_message(job)
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


async def _deliveries(channel: Channel, queue: str, total: int) -> AsyncIterator[Delivery]:
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


class _Pacer:
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
