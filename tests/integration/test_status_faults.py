"""Status tracking when the status exchange goes away under it, and with events nobody asked for."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import pytest
from pydantic import BaseModel

from brokerjobs import App, Publisher, job
from brokerjobs.envelope import OutgoingMessage, new_job_id
from brokerjobs.errors import UnroutableJob
from brokerjobs.status import (
    JobStatus,
    MemoryStatusStore,
    StatusEmitter,
    StatusTracker,
    report_progress,
)
from brokerjobs.topology import status_exchange_name
from tests.support.broker import Broker, make_settings, running_worker, unique, wait_for


@job("statusfault.work")
class Work(BaseModel):
    n: int


def event(job_id: str) -> OutgoingMessage:
    body = JobStatus(job_id=job_id, job="statusfault.work", state="completed").model_dump_json()
    return OutgoingMessage(
        body=body.encode(), message_id=new_job_id(), job_name=None, priority=0, headers={}
    )


async def test_a_tracker_follows_events_again_after_its_exchange_was_deleted(
    broker: Broker,
) -> None:
    exchange = unique("statusfault")
    status = status_exchange_name(exchange)
    broker.track_exchange(status)
    tracker = StatusTracker(make_settings(), exchange=exchange, rebind_interval=0.2)
    async with tracker:
        channel = await broker.fresh_channel()
        await channel.delete_exchange(status)  # the tracker's bindings go with it, silently
        await channel.declare_exchange(status, "topic")  # as the next worker start does

        probes: list[str] = []

        async def seen() -> bool:
            """Has an earlier probe arrived? If not, send another one."""
            for probe in probes:
                if await tracker.get(probe) is not None:
                    return True
            probes.append(new_job_id())
            with contextlib.suppress(UnroutableJob):  # until the tracker has bound again
                await (await broker.fresh_channel()).publish(event(probes[-1]), status, "x.c")
            return False

        await wait_for(seen, 10)


async def test_a_tracker_stops_at_once_not_at_its_next_rebind(broker: Broker) -> None:
    exchange = unique("statusstop")
    broker.track_exchange(status_exchange_name(exchange))
    tracker = StatusTracker(make_settings(), exchange=exchange, rebind_interval=600)
    await tracker.start()
    closing = asyncio.ensure_future(tracker.close())
    done, _ = await asyncio.wait({closing}, timeout=5)
    # Its session waited for all of stop, a lost connection and a closed channel (ten minutes
    # here), not for the first of them.
    assert closing in done, "close() waited for the tracker's rebind timer"


async def test_a_status_event_to_a_missing_exchange_is_logged_not_raised(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    channel = await broker.connection.channel(confirms=True)
    try:
        emitter = StatusEmitter(channel, unique("statusmissing"))  # never declared
        status = JobStatus(job_id=new_job_id(), job="statusfault.work", state="completed")
        await emitter.emit(status)  # must not raise into the consumer's hook
        assert "lost" in caplog.text
    finally:
        await channel.close()


async def test_the_memory_store_is_bounded_and_keeps_the_newest_jobs() -> None:
    store = MemoryStatusStore(max_jobs=10)
    ids = [new_job_id() for _ in range(50)]
    for job_id in ids:  # events for ids nobody marked as waiting
        await store.put(JobStatus(job_id=job_id, job="statusfault.work", state="active"))
    assert [await store.get(i) is not None for i in ids] == [False] * 40 + [True] * 10


async def test_deleting_the_status_exchange_re_runs_no_job(broker: Broker) -> None:
    app = App(unique("statusdel"), track_status=True)
    runs: Counter[int] = Counter()

    @app.handler(Work)
    async def handle(work: Work) -> None:
        runs[work.n] += 1

    broker.track(app)

    async with running_worker(app) as worker:
        channel = await broker.fresh_channel()
        await channel.delete_exchange(status_exchange_name(app.exchange))
        async with Publisher.for_app(app, make_settings()) as publisher:
            for n in range(3):
                await publisher.publish(Work(n=n))
        await wait_for(lambda: len(runs) == 3 and worker.ready, 15)
        assert worker.reconnects == 0
    assert set(runs.values()) == {1}


class Counting(MemoryStatusStore):
    def __init__(self) -> None:
        super().__init__()
        self.events = 0

    async def put(self, status: JobStatus) -> None:
        self.events += 1
        await super().put(status)


async def test_progress_reported_per_row_of_a_large_file_does_not_hold_the_job_up(
    broker: Broker,
) -> None:
    """Each report was one publish, queued ahead of the final event and the ack: 200,000 of
    them took minutes. Only the newest value not yet sent is kept."""
    rows = 200_000
    app = App(unique("statusrows"), track_status=True)

    @app.handler(Work)
    def import_rows(work: Work) -> None:  # a plain function: in a thread, as real imports are
        for row in range(work.n):
            report_progress(100 * row / work.n, f"row {row}")

    broker.track(app)

    store = Counting()
    tracking = StatusTracker(make_settings(), exchange=app.exchange, store=store)
    async with tracking as tracker, running_worker(app):
        job_id = new_job_id()
        async with Publisher.for_app(app, make_settings()) as publisher:
            await publisher.publish(Work(n=rows), job_id=job_id)
        final = await tracker.wait(job_id, timeout=60)
    assert final.state == "completed"
    assert store.events < rows / 10
