"""A schedule whose job cannot be published (refused by a full queue, not encodable) costs only
its own ticks: the leader keeps its token and the other schedules keep firing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from brokerjobs import App, job
from brokerjobs.scheduler import Scheduler, scheduler_queue
from tests.support.broker import Broker, make_settings, unique, wait_for
from tests.support.ticks import assert_consecutive, tick_of


@job("schedfault.beat")
class Beat(BaseModel):
    at: datetime


@job("schedfault.full")
class Refused(BaseModel):
    at: datetime


class Opaque:
    """A value pydantic cannot serialise."""


@job("schedfault.opaque")
class Unencodable(BaseModel):
    model_config = {"arbitrary_types_allowed": True}
    value: Opaque


def fault_app(broker: Broker) -> App:
    app = App(unique("schedfault"))

    @app.handler(Beat)
    async def handle(task: Beat) -> None: ...

    @app.handler(Unencodable)
    async def opaque(task: Unencodable) -> None: ...

    broker.track(app)
    broker.track_queue(scheduler_queue(app))
    return app


async def full_queue(broker: Broker, app: App) -> str:
    """A queue bound for ``schedfault.full`` that refuses every message (nack)."""
    name = f"{app.name}.full"
    broker.track_queue(name)
    channel = await broker.fresh_channel()
    await channel.declare_exchange(app.exchange, "topic")
    await channel.declare_queue(name, {"x-max-length": 0, "x-overflow": "reject-publish"})
    await channel.bind(name, app.exchange, "schedfault.full")
    return name


async def test_a_refused_or_unencodable_schedule_does_not_stop_the_others(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    app = fault_app(broker)
    await full_queue(broker, app)
    # Registered first: their failures come before the beat in every pass.
    app.schedule(lambda at: Refused(at=at), every=1, name="refused")
    app.schedule(lambda: Unencodable(value=Opaque()), every=1, name="opaque")
    app.schedule(lambda at: Beat(at=at), every=1, name="beat")
    scheduler = Scheduler(app, make_settings())
    task = asyncio.create_task(scheduler.run())
    try:
        await wait_for(lambda: task.done() or scheduler.published >= 3, 15)
        assert not task.done(), task.exception()
        assert scheduler.reconnects == 0  # the token was never given up
        assert scheduler.is_leader
    finally:
        scheduler.stop()
        await asyncio.wait_for(task, 15)

    beats = await broker.drain(f"{app.name}.schedfault.beat")
    assert len(beats) >= 3
    assert_consecutive(sorted(tick_of(d) for d in beats))
    actions = {getattr(r, "action", None) for r in caplog.records}
    assert {"tick_refused", "tick_failed"} <= actions
    assert await broker.depth(f"{app.name}.schedfault.opaque") == 0


async def test_state_left_by_a_leader_whose_clock_was_ahead_does_not_stop_the_schedules(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """An instance with its clock a year ahead led once: its token says every tick up to next
    year is done. Once it is gone, the others must fire again, not wait a year in silence."""
    app = fault_app(broker)
    app.schedule(lambda at: Beat(at=at), every=1, name="beat")
    ahead = datetime.now(UTC) + timedelta(days=365)
    skewed = Scheduler(app, make_settings(), clock=lambda: ahead)
    task = asyncio.create_task(skewed.run())
    try:
        await wait_for(lambda: task.done() or "beat" in skewed.state, 10)
    finally:
        skewed.stop()
        await asyncio.wait_for(task, 15)

    scheduler = Scheduler(app, make_settings())
    task = asyncio.create_task(scheduler.run())
    try:
        await wait_for(lambda: task.done() or scheduler.published >= 2, 15)
    finally:
        scheduler.stop()
        await asyncio.wait_for(task, 15)
    assert "clock_ahead" in {getattr(r, "action", None) for r in caplog.records}
    beats = await broker.drain(f"{app.name}.schedfault.beat")
    assert all(tick_of(d) < ahead - timedelta(days=300) for d in beats)


async def test_the_app_exchange_deleted_under_a_leader_is_declared_again(broker: Broker) -> None:
    app = fault_app(broker)
    app.schedule(lambda at: Beat(at=at), every=1, name="beat")
    scheduler = Scheduler(app, make_settings())
    task = asyncio.create_task(scheduler.run())
    try:
        await wait_for(lambda: task.done() or scheduler.published >= 1, 15)
        await (await broker.fresh_channel()).delete_exchange(app.exchange)
        published = scheduler.published
        await wait_for(lambda: task.done() or scheduler.published >= published + 2, 20)
        assert not task.done(), task.exception()
    finally:
        scheduler.stop()
        await asyncio.wait_for(task, 15)
