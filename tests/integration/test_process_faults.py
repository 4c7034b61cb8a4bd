"""Faults against the real broker: worker processes killed (SIGKILL) and stopped (SIGTERM)
mid-batch. Every job is counted: each confirmed job must be processed at least once, and
duplicates stay within what at-least-once delivery allows (the unacked window, i.e. prefetch).

The workers run ``python -m brokerjobs.cli worker tests.support.fault_app:app``; its handler
appends ``start``/``done`` records to a file with one ``write(2)`` each, so the records survive a
SIGKILL of the worker.
"""

from __future__ import annotations

import collections
import signal
import time
from pathlib import Path

import pytest

from tests.support.broker import Broker, unique, wait_for
from tests.support.fault_app import Records, queue_name, read_records
from tests.support.faults import (
    WorkerProcess,
    consuming,
    depth_is,
    duplicates,
    fault_topology,
    finish_with,
    publish_jobs,
    report,
    worker_processes,
)

pytestmark = pytest.mark.slow


# -- SIGKILL -------------------------------------------------------------------------------------


async def test_sigkill_mid_batch_loses_no_job(broker: Broker, tmp_path: Path) -> None:
    """A worker killed with -9 mid-batch: its unacked jobs go to the next worker; none is lost,
    and only the unacked window (at most prefetch) can run twice."""
    total, prefetch = 500, 20
    name, records = unique("sigkill"), tmp_path / "records"
    app = await fault_topology(broker, name, records)
    queue = queue_name(app.name)
    confirmed = await publish_jobs(app.exchange, total)
    assert await broker.depth(queue) == total

    with worker_processes() as start:
        # 10 to 20 ms per job, so that jobs finish one by one and some are always in flight.
        first = start(name, records, tmp_path / "w1.log", 0.01, 1.0, prefetch=str(prefetch))
        at_kill = await sigkill_a_third_through(broker, queue, first, records, total)
        done_by_first = set(at_kill.done_ids(first.pid))
        unfinished = set(at_kill.started_ids(first.pid)) - done_by_first
        assert len(done_by_first) < total, "the kill came too late: the first worker did all"
        assert len(unfinished) <= prefetch

        second = start(name, records, tmp_path / "w2.log", 0.01, prefetch=str(prefetch))
        await finish_with(broker, queue, second, records, confirmed, 30)

    processed = read_records(records).done_ids()
    dupes = duplicates(processed)
    report(
        "sigkill",
        confirmed=len(confirmed),
        processed_before_kill=len(done_by_first),
        in_flight_at_kill=len(unfinished),
        processed_total=len(processed),
        distinct=len(set(processed)),
        duplicates=dupes,
    )
    assert set(processed) == set(confirmed)
    assert dupes <= prefetch
    # Only jobs the first worker had unacked when it died can run twice.
    assert {j for j, n in collections.Counter(processed).items() if n > 1} <= set(
        at_kill.started_ids(first.pid)
    )
    assert await broker.depth(queue) == 0


async def sigkill_a_third_through(
    broker: Broker, queue: str, worker: WorkerProcess, records: Path, total: int
) -> Records:
    """SIGKILL ``worker`` once a third of the jobs are done and some are in flight; the
    records as they were at the kill."""
    await consuming(broker, queue, worker)

    def a_third_done() -> bool:
        r = read_records(records)
        return len(r.done) >= total // 3 and len(r.started) > len(r.done)

    await wait_for(a_third_done, 20, interval=0.005)
    worker.signal(signal.SIGKILL)
    assert await worker.exited(5) == -signal.SIGKILL
    return read_records(records)


# -- SIGTERM -------------------------------------------------------------------------------------


async def test_sigterm_finishes_in_flight_jobs_and_leaves_the_rest_queued(
    broker: Broker, tmp_path: Path
) -> None:
    """SIGTERM drains: the worker stops taking jobs, finishes (and acks) every job it started,
    exits 0 well within the grace period; all other jobs stay queued for the next worker."""
    total, prefetch, grace = 40, 10, 10.0
    name, records = unique("sigterm"), tmp_path / "records"
    app = await fault_topology(broker, name, records)
    queue = queue_name(app.name)
    confirmed = await publish_jobs(app.exchange, total)

    with worker_processes() as start:
        # 0.4 to 0.8 s per job: the in-flight jobs finish one after another
        settings = {"prefetch": str(prefetch), "shutdown_grace": str(grace)}
        first = start(name, records, tmp_path / "w1.log", 0.4, spread=1.0, **settings)
        await consuming(broker, queue, first)
        in_flight_at_term, drain_seconds = await sigterm_mid_wave(first, records, prefetch, grace)
        done = check_drained(read_records(records), first.pid, in_flight_at_term)
        # Every finished job was acked before the connection closed; the rest are queued.
        await wait_for(lambda: depth_is(broker, queue, total - len(done)), 5)

        second = start(name, records, tmp_path / "w2.log", 0.0, prefetch=str(prefetch))
        await finish_with(broker, queue, second, records, confirmed, 20)

    processed = read_records(records).done_ids()
    report(
        "sigterm",
        confirmed=len(confirmed),
        in_flight_at_sigterm=len(in_flight_at_term),
        done_by_first=len(done),
        left_in_queue=total - len(done),
        processed_total=len(processed),
        duplicates=duplicates(processed),
        drain_s=f"{drain_seconds:.2f}",
    )
    assert set(processed) == set(confirmed)
    assert duplicates(processed) == 0, "a graceful stop must not make a finished job run again"
    assert await broker.depth(queue) == 0


async def sigterm_mid_wave(
    worker: WorkerProcess, records: Path, prefetch: int, grace: float
) -> tuple[set[str], float]:
    """SIGTERM ``worker`` with some jobs done and several in flight; the jobs in flight then,
    and how long the drain took (the worker must exit 0 within the grace period)."""

    def in_flight(r: Records) -> set[str]:
        return set(r.started_ids(worker.pid)) - set(r.done_ids(worker.pid))

    def second_wave() -> bool:  # some jobs done, several in flight
        r = read_records(records)
        return len(r.done) >= prefetch and len(in_flight(r)) >= prefetch // 2

    await wait_for(second_wave, 15, interval=0.005)
    in_flight_at_term = in_flight(read_records(records))
    signalled_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    exit_code = await worker.exited(grace + 5)
    drain_seconds = time.monotonic() - signalled_at
    assert exit_code == 0, worker.log()
    assert drain_seconds < grace, f"drain took {drain_seconds:.1f}s: jobs hit the grace"
    return in_flight_at_term, drain_seconds


def check_drained(after: Records, pid: int, in_flight_at_term: set[str]) -> list[str]:
    """The drained worker finished every job it started; returns the ids it finished."""
    started = after.started_ids(pid)
    done = after.done_ids(pid)
    assert in_flight_at_term, "no job was in flight at SIGTERM"
    # No start without done: neither a job in flight at SIGTERM nor one delivered during
    # the drain (the consumer must be cancelled first) was cut short.
    unfinished = set(started) - set(done)
    assert not unfinished, f"{len(unfinished)} job(s) the worker started never finished"
    assert len(started) == len(done) == len(set(done))
    assert in_flight_at_term <= set(done)
    return done
