"""Handlers that hang past their timeout cannot take the worker with them.

A timed-out thread handler keeps its thread (Python cannot stop it) but not its slot: unrelated
sync jobs run at once on spare threads, the same job is not run again while its old thread runs,
and readiness turns false once hung threads hold every spare thread. A timed-out process handler
has its process killed and replaced.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from brokerjobs import App
from brokerjobs.envelope import PARK_REASON
from brokerjobs.publisher import Publisher
from tests.support import hung_app
from tests.support.broker import Broker, make_settings, running_worker, unique, wait_for
from tests.support.fault_app import read_records
from tests.support.hung_app import HANG_S, Hang, QuickJob, quick_job


def hung_app_for(mode: Literal["thread", "process"], broker: Broker) -> App:
    app = App(unique("hung"))
    queue = app.queue(f"{app.name}.jobs", "hung.#")
    hang = hung_app.hang_in_thread if mode == "thread" else hung_app.hang_in_process
    app.handler(Hang, queue=queue, timeout=1.0, run_in=mode)(hang)
    app.handler(QuickJob, queue=queue, run_in=mode)(quick_job)
    return broker.track(app)


async def quick_jobs_waited(app: App, records: Path, hung: int, quick: int) -> list[float]:
    """Publish ``hung`` hanging jobs, then ``quick`` quick ones; how long each quick one waited."""
    async with Publisher(make_settings(), exchange=app.exchange) as publisher:
        await publisher.publish_many([Hang(n=i) for i in range(hung)])
        published = time.time()
        await publisher.publish_many([QuickJob(n=i, log=str(records)) for i in range(quick)])
    await wait_for(lambda: len(read_records(records).done) == quick, timeout=HANG_S * 2)
    return [float(r.split(":")[1]) - published for r in read_records(records).done_ids()]


async def parked_reasons(broker: Broker, queue: str, count: int) -> list[str]:
    parked: list[str] = []

    async def all_parked() -> bool:
        parked.extend(str(d.headers.get(PARK_REASON)) for d in await broker.drain(queue))
        return len(parked) >= count

    await wait_for(all_parked, timeout=HANG_S)
    return parked


async def test_hung_thread_handlers_do_not_hold_back_unrelated_sync_jobs(
    broker: Broker, tmp_path: Path
) -> None:
    hung_app.RELEASE.clear()
    app = hung_app_for("thread", broker)
    try:
        # prefetch = sync_workers: every hang job starts (none times out waiting for a slot).
        settings = make_settings(sync_workers=2, prefetch=2)
        async with running_worker(app, settings) as worker:
            waited = await quick_jobs_waited(app, tmp_path / "records", hung=4, quick=3)
            threads = worker._executors.threads
            still_hung = threads.abandoned
            reasons = await parked_reasons(broker, f"{app.name}.jobs.parked", 4)
            print(
                f"\n[hung-thread] quick jobs waited {[round(w, 2) for w in waited]} s, "
                f"hung threads {still_hung}, ready {worker.ready}"
            )
            assert still_hung >= 1  # the quick jobs finished while hung handlers still ran
            assert worker.ready
            # Each hung job ran once: its retry found the old thread still running.
            assert all("still runs in a thread" in r for r in reasons), reasons
    finally:
        hung_app.RELEASE.set()


async def test_readiness_turns_false_when_hung_threads_hold_every_spare_thread(
    broker: Broker,
) -> None:
    hung_app.RELEASE.clear()
    app = hung_app_for("thread", broker)
    try:
        async with running_worker(app, make_settings(sync_workers=1, prefetch=1)) as worker:
            spare = worker._executors.threads.headroom
            async with Publisher(make_settings(), exchange=app.exchange) as publisher:
                await publisher.publish_many([Hang(n=i) for i in range(spare)])
            await wait_for(lambda: not worker.ready, timeout=spare * 1.0 + 10)
            problems = worker.problems()
            hung_app.RELEASE.set()
            await wait_for(lambda: worker.ready, timeout=10)
        print(f"\n[hung-ready] not ready with {spare} hung: {problems}")
        assert any("timed-out sync handler" in p for p in problems), problems
    finally:
        hung_app.RELEASE.set()


async def test_a_hung_process_handler_is_killed_and_its_slot_freed(
    broker: Broker, tmp_path: Path
) -> None:
    app = hung_app_for("process", broker)
    async with running_worker(app, make_settings()) as worker:
        runner = worker._executors.processes
        waited = await quick_jobs_waited(app, tmp_path / "records", hung=4, quick=3)
        reasons = await parked_reasons(broker, f"{app.name}.jobs.parked", 4)
        print(
            f"\n[hung-process] quick jobs waited {[round(w, 2) for w in waited]} s, "
            f"processes killed {runner.killed}"
        )
    assert max(waited) < HANG_S  # no quick job waited for a hung process to finish
    assert runner.killed >= 4
    assert all("timed out after 1s" in r for r in reasons), reasons
