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
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from brokerjobs import envelope as wire
from brokerjobs.archive import Digest, Summary, read_export, record_line, write_export
from brokerjobs.broker import default_broker
from brokerjobs.broker.base import Broker
from brokerjobs.broker.base import BrokerConnection as Connection
from brokerjobs.envelope import Decoded, Delivery, decode
from brokerjobs.errors import ParkingError, TopologyError
from brokerjobs.jobs import JobSpec
from brokerjobs.parked import EVERYTHING, ParkedJob, Selection, replay_message
from brokerjobs.parking_scan import (
    ImportReport,
    Pacer,
    Progress,
    Report,
    Settler,
    Verdict,
    deliveries,
)
from brokerjobs.settings import Settings
from brokerjobs.telemetry import Telemetry
from brokerjobs.topology import DEFAULT_EXCHANGE, parking_queue_name

# The parking API by its old address (parking_cli and testing import these from here).
__all__ = [
    "EVERYTHING",
    "ImportReport",
    "ParkedJob",
    "ParkingLot",
    "Report",
    "Selection",
    "replay_message",
]


DEPTH_REREADS = 20
DEPTH_REREAD_S = 0.05


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
        """How many jobs are parked. A quorum queue's reported count lags messages that were
        just returned (a scan before this one kept them): a count of 0 is checked with a get,
        and read again until it shows them."""
        channel = await self.connection.channel(confirms=False)
        try:
            count = (await channel.inspect_queue(self.parking_queue)).messages
            if count > 0:
                return count
            probe = await channel.get(self.parking_queue)
            if probe is None:
                return 0
            await channel.nack(probe.delivery_tag, requeue=True)
            for _ in range(DEPTH_REREADS):
                count = (await channel.inspect_queue(self.parking_queue)).messages
                if count > 0:
                    return count
                await asyncio.sleep(DEPTH_REREAD_S)
            return 1  # the count never caught up: at least the one the get saw
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
        pace = Pacer(rate)

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

        The whole file is verified first (format, count, checksum). A record is skipped for
        each job of its id already in the parking queue, so an import that failed midway can
        simply be run again. A record without an id (a broker's dead letter) is given one from
        its content, the same on every run. Each record is published as ``envelope.copy_of``
        would copy it.
        """
        deliveries, _ = read_export(path)
        present = Counter(_import_id(job.delivery) for job in (await self.list()).jobs)
        report = ImportReport()
        todo = []
        for delivery in deliveries:
            job_id = _import_id(delivery)
            if present[job_id] > 0:  # counted: two records sharing an id are two jobs
                present[job_id] -= 1
                report.skipped.append(job_id)
            else:
                todo.append(
                    wire.copy_of(replace(delivery, message_id=job_id), dict(delivery.headers))
                )
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
        settling = Settler(reader, writer, self.queue, self._window, report, self.telemetry)
        try:
            async for delivery in deliveries(reader, self.parking_queue, total):
                job = ParkedJob(delivery)
                report.scanned += 1
                if settling.came_back(job):
                    continue  # our own replay came back already: leave it for a later run
                if self._selected(selection, job, now, report):
                    await settling.settle(delivery, job, await visit(job))
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


def _import_id(delivery: Delivery) -> str:
    """A record's job id, or for one without, an id derived from its content."""
    return delivery.message_id or hashlib.sha256(record_line(delivery)).hexdigest()[:32]
