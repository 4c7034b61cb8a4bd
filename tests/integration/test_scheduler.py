"""The scheduler against the real broker: with several instances each tick is published once;
a stopped leader hands over; missed ticks follow catch_up; one token, refreshed. (A killed
leader process: ``test_scheduler_process``.)

Every scheduled job carries ``bj-scheduled-for`` (its tick) and a message id derived from the
schedule and the tick, so the tests count ticks from the jobs in the app's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from pydantic import BaseModel

from brokerjobs import App, job
from brokerjobs.envelope import Delivery
from brokerjobs.errors import PublishInterrupted
from brokerjobs.schedule import CatchUp, merge_state
from brokerjobs.scheduler import (
    SCHEDULE,
    Scheduler,
    decode_state,
    scheduler_queue,
)
from brokerjobs.scheduler_token import TokenSession
from tests.support.broker import Broker, make_settings, unique, wait_for
from tests.support.ticks import SECOND, assert_consecutive, assert_job_ids, tick_of


@job("sched.beat")
class Beat(BaseModel):
    at: datetime
    mode: str = ""


def beat_app(prefix: str, broker: Broker) -> App:
    app = App(unique(prefix))

    @app.handler(Beat)
    async def handle(task: Beat) -> None: ...

    broker.track(app)
    broker.track_queue(scheduler_queue(app))
    return app


def beat_queue(app: App) -> str:
    return f"{app.name}.sched.beat"


@contextlib.asynccontextmanager
async def running(scheduler: Scheduler) -> AsyncIterator[asyncio.Task[None]]:
    """Run a scheduler in this loop until the block ends (graceful stop)."""
    task = asyncio.create_task(scheduler.run())
    try:
        yield task
    finally:
        scheduler.stop()
        await asyncio.wait_for(task, 15)


def alive(*tasks: asyncio.Task[None]) -> bool:
    """False (so ``alive(task) or condition`` waits on the condition); raises if a task ended."""
    for task in tasks:
        if task.done():
            task.result()  # raise what stopped it
            raise AssertionError("a scheduler stopped by itself")
    return False


@pytest.mark.slow
async def test_two_schedulers_publish_each_tick_exactly_once(broker: Broker) -> None:
    app = beat_app("sched2", broker)
    app.schedule(lambda at: Beat(at=at), every=1, name="beat")
    a, b = Scheduler(app, make_settings()), Scheduler(app, make_settings())
    async with running(a) as task_a, running(b) as task_b:  # started together: a bootstrap race
        await wait_for(lambda: alive(task_a, task_b) or a.published + b.published >= 4, 10)
        assert [a.is_leader, b.is_leader].count(True) == 1

    jobs = await broker.drain(beat_queue(app))
    ticks = sorted(tick_of(d) for d in jobs)
    print(f"{len(ticks)} ticks {ticks[0]}..{ticks[-1]}; published {a.published}/{b.published}")
    assert len(ticks) >= 4
    assert_consecutive(ticks)
    assert sorted([a.published, b.published]) == [0, len(jobs)]  # one leader did all the work
    assert_job_ids(jobs, app.exchange, "beat")
    for delivery in jobs:
        assert delivery.job_name == "sched.beat" and delivery.persistent
        assert delivery.headers[SCHEDULE] == "beat"
        assert Beat.model_validate_json(delivery.body).at == tick_of(delivery)
    # Whoever created a token at start-up, exactly one is left, held by no one.
    await wait_for(lambda: broker.depth_is(scheduler_queue(app), 1), 5)


@pytest.mark.slow
async def test_a_stopped_leader_hands_over_without_gap_or_duplicate(broker: Broker) -> None:
    app = beat_app("schedstop", broker)
    app.schedule(lambda at: Beat(at=at), every=1, name="beat")
    a, b = Scheduler(app, make_settings()), Scheduler(app, make_settings())
    async with running(a) as task_a:
        await wait_for(lambda: alive(task_a) or a.is_leader, 10)
        async with running(b) as task_b:
            await wait_for(lambda: alive(task_b) or b._session is not None, 10)  # standing by
            await wait_for(lambda: _standby_seen(broker, app), 10)
            await wait_for(lambda: alive(task_a, task_b) or a.published >= 2, 10)
            a.stop()
            await asyncio.wait_for(task_a, 10)
            stopped = time.monotonic()
            await wait_for(lambda: alive(task_b) or b.is_leader, 5)
            handover = time.monotonic() - stopped
            await wait_for(lambda: alive(task_b) or b.published >= 2, 5)

    jobs = await broker.drain(beat_queue(app))
    ticks = sorted(tick_of(d) for d in jobs)
    print(f"handover in {handover * 1000:.0f} ms; ticks {a.published} by a, {b.published} by b")
    assert handover < 2
    assert_consecutive(ticks)
    assert a.published + b.published == len(ticks)  # a graceful stop duplicates nothing
    # The second instance added no token.
    await wait_for(lambda: broker.depth_is(scheduler_queue(app), 1), 5)


async def _standby_seen(broker: Broker, app: App) -> bool:
    """Both instances are consumers of the scheduler queue, as far as the broker says: a
    single-active-consumer quorum queue counts only the active one."""
    expected = 1 if app.queue_kind == "quorum" else 2
    return (await broker.state(scheduler_queue(app))).consumers == expected


@pytest.mark.slow
async def test_missed_ticks_after_downtime_follow_each_catch_up_rule(broker: Broker) -> None:
    """Frozen clocks make the downtime exact: stopped with every tick up to x done, the next
    leader wakes at x + 3.7 s, so x+1..x+3 are all missed (grace 0.5 s) and none is on time."""
    app = beat_app("schedcatch", broker)
    modes: tuple[CatchUp, ...] = ("all", "latest", "none")
    for mode in modes:
        make = partial(Beat, mode=mode)
        app.schedule(lambda at, b=make: b(at=at), every=1, name=mode, catch_up=mode, grace=0.5)
    x = datetime.now(UTC).replace(microsecond=0)
    first = Scheduler(app, make_settings(), clock=lambda: x + timedelta(seconds=0.2))
    async with running(first) as task:
        await wait_for(lambda: alive(task) or len(first.state) == 3, 10)
    assert first.published == 0  # a new schedule starts after now
    assert await _peek_state(broker, scheduler_queue(app)) == dict.fromkeys(modes, x)

    later = x + timedelta(seconds=3.7)
    second = Scheduler(app, make_settings(), clock=lambda: later)
    async with running(second) as task:
        caught_up = dict.fromkeys(modes, x + 3 * SECOND)
        await wait_for(lambda: alive(task) or second.state == caught_up, 10)

    jobs = await broker.drain(beat_queue(app))
    by_mode: dict[str, list[datetime]] = {"all": [], "latest": [], "none": []}
    for delivery in jobs:
        beat = Beat.model_validate_json(delivery.body)
        by_mode[beat.mode].append(beat.at)
    assert by_mode == {
        "all": [x + SECOND, x + 2 * SECOND, x + 3 * SECOND],
        "latest": [x + 3 * SECOND],
        "none": [],
    }
    assert await _peek_state(broker, scheduler_queue(app)) == dict.fromkeys(modes, x + 3 * SECOND)


async def _peek_state(broker: Broker, queue: str) -> dict[str, datetime]:
    """What the next leader would know: every token merged. All go back to the queue.

    A stopping leader may leave older tokens of its own unacked (they came back after its last
    persist); closing requeues them ahead of the newest one, and the next leader merges them.
    Taken by consuming, as a leader does: quorum queues refuse basic.get with a single active
    consumer.
    """
    await wait_for(lambda: _tokens_ready(broker, queue), 5)
    count = await broker.depth(queue)
    tokens: list[Delivery] = []

    async def take(delivery: Delivery) -> None:
        tokens.append(delivery)

    channel = await broker.connection.channel(confirms=False)
    try:
        await channel.consume(queue, take)
        await wait_for(lambda: len(tokens) >= count, 5)
    finally:
        await channel.close()  # requeues every token it got
    state: dict[str, datetime] = {}
    for token in tokens:
        merge_state(state, decode_state(token.body))
    assert state, "no token in the scheduler queue"
    return state


async def _tokens_ready(broker: Broker, queue: str) -> bool:
    """Every token is back (no consumer holds one) and there is at least one."""
    state = await broker.state(queue)
    return state.consumers == 0 and state.messages > 0


@pytest.mark.slow
async def test_a_crash_between_publishing_a_tick_and_recording_it_repeats_that_tick(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented duplicate: the job is confirmed, then the connection dies before the new
    token is; the next leader publishes the same tick again, with the same job id."""
    app = beat_app("schedcrash", broker)
    app.schedule(lambda at: Beat(at=at), every=1, name="beat")
    scheduler = Scheduler(app, make_settings())
    crashed_after: list[int] = []
    persist = TokenSession.persist

    async def crash_once_after_the_second_tick(session: TokenSession) -> None:
        if scheduler.published == 2 and not crashed_after:
            crashed_after.append(scheduler.published)
            await session.connection.close()
            raise PublishInterrupted("simulated crash before the token was confirmed")
        await persist(session)

    monkeypatch.setattr(TokenSession, "persist", crash_once_after_the_second_tick)
    async with running(scheduler) as task:
        await wait_for(lambda: alive(task) or scheduler.published >= 4, 10)
    assert crashed_after and scheduler.reconnects == 1

    jobs = await broker.drain(beat_queue(app))
    counts = Counter(tick_of(d) for d in jobs)
    [(repeated, twice)] = [(tick, n) for tick, n in counts.items() if n > 1]
    assert twice == 2 and repeated == sorted(counts)[1]  # the second tick, in flight
    assert_consecutive(sorted(counts))
    assert_job_ids(jobs, app.exchange, "beat")  # so both copies carry one id


async def test_the_token_is_refreshed_and_stays_single(broker: Broker) -> None:
    app = beat_app("schedrefresh", broker)
    app.schedule(lambda: Beat(at=datetime.now(UTC)), every=3600, name="hourly")
    scheduler = Scheduler(app, make_settings(), refresh_interval=0.1)
    async with running(scheduler) as task:
        await wait_for(lambda: alive(task) or scheduler.persists >= 5, 10)
    # The stopped scheduler's token comes back (on quorum queues, not at once).
    await wait_for(lambda: broker.depth_is(scheduler_queue(app), 1), 5)
    assert await broker.depth(beat_queue(app)) == 0
