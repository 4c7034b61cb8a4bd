"""Stopping, cancelling and failing in the middle: every delivery still reported once, every
connection closed, every token handed over (the real components on the in-memory broker)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from pydantic import BaseModel

from brokerjobs import App, JobRun, Middleware, Publisher, Scheduler, Settings, Worker, job
from brokerjobs.broker.memory import MemoryBroker
from brokerjobs.testing import TestBroker
from tests.support.memory import drive_until

OFFLINE = "amqp://guest:guest@memory.invalid/"


@job("paths.step")
class Step(BaseModel):
    n: int


class SlowReceived(Middleware):
    def __init__(self) -> None:
        self.received_count = 0
        self.settled: list[str] = []

    async def received(self, run: JobRun) -> None:
        self.received_count += 1
        await asyncio.sleep(30)  # still here when the shutdown's grace period ends

    async def after_settle(self, run: JobRun) -> None:
        assert run.settled is not None
        self.settled.append(run.settled.outcome.value)


async def test_a_delivery_cancelled_in_a_received_hook_is_still_reported_once() -> None:
    spy = SlowReceived()
    app = App("paths", middleware=[spy])

    @app.handler(Step)
    async def handle(step: Step) -> None: ...

    memory = MemoryBroker()
    settings = Settings(url=OFFLINE, shutdown_grace=0.2)
    worker = Worker(app, settings, broker=memory)
    running = asyncio.create_task(worker.run())
    await drive_until(memory, lambda: worker.ready)
    async with Publisher.for_app(app, settings, broker=memory) as publisher:
        await publisher.publish(Step(n=1))
    await drive_until(memory, lambda: spy.received_count == 1)
    worker.stop()
    await asyncio.wait_for(running, 10)
    assert spy.settled == ["requeued"]
    assert memory.queue_depths()["paths.paths.step"] == 1  # given back, not lost


@job("paths.tick")
class Tick(BaseModel):
    pass


async def test_a_cancelled_scheduler_closes_its_connection_and_hands_over() -> None:
    app = App("paths")

    @app.handler(Tick)
    async def tick(_: Tick) -> None: ...

    app.schedule(Tick(), every=timedelta(seconds=1))
    memory = MemoryBroker()
    settings = Settings(url=OFFLINE)
    first = Scheduler(app, settings, broker=memory, refresh_interval=1.0)
    leading = asyncio.create_task(first.run())
    await drive_until(memory, lambda: first.is_leader)
    leading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leading
    assert [c.role for c in memory.connections if not c.is_closed] == []
    second = Scheduler(app, settings, broker=memory, refresh_interval=1.0)
    standby = asyncio.create_task(second.run())
    try:
        await drive_until(memory, lambda: second.is_leader)
    finally:
        second.stop()
        await asyncio.wait_for(standby, 10)


async def test_test_broker_replay_moves_jobs_back_and_the_next_run_handles_them() -> None:
    app = App("paths")
    calls: list[int] = []
    fixed = False

    @app.handler(Step)
    async def handle(step: Step) -> None:
        calls.append(step.n)
        if not fixed:
            raise ValueError("not yet")

    async with TestBroker(app) as broker:
        await broker.publish(Step(n=1))
        await broker.run_until_idle()
        attempts = len(calls)
        assert await broker.replay("paths.paths.step") == 1
        assert len(calls) == attempts  # replay only moved it back
        assert broker.queue_depths()["paths.paths.step"] == 1
        fixed = True
        await broker.run_until_idle()
    assert broker.completed(Step) == [Step(n=1)]
