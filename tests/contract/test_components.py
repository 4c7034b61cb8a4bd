"""Every real component on both brokers: the worker with its pipeline, reconnects, the parking
lot, the scheduler's leader handover and status events, on RabbitMQ and in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from pydantic import BaseModel

from brokerjobs import (
    App,
    JobRun,
    Middleware,
    ParkingLot,
    PermanentFailure,
    Publisher,
    Retry,
    RetryLater,
    RetryPolicy,
    Scheduler,
    SkipJob,
    SlowJob,
    StatusTracker,
    Worker,
    current_job,
    job,
)
from brokerjobs.parking import Selection
from tests.contract.components import Env, open_env, running
from tests.support.broker import unique

pytestmark = pytest.mark.timeout(90)

QUICK_RETRY = RetryPolicy(delays=(0.2,), max_attempts=3)


@job("contract.step")
class Step(BaseModel):
    n: int


@pytest.fixture(params=["amqp", "memory"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    async with open_env(request.param) as opened:
        yield opened


def worker_for(app: App, env: Env) -> Worker:
    return Worker(env.track(app), env.settings, broker=env.broker)


def publisher_for(app: App, env: Env) -> Publisher:
    return Publisher.for_app(app, env.settings, broker=env.broker)


class Recorder(Middleware):
    """A user middleware: what it saw, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, str]] = []

    async def before_handler(self, run: JobRun) -> None:
        self.events.append(("start", run.attempt, run.job_name))

    async def after_failure(self, run: JobRun) -> None:
        decision = "retry" if isinstance(run.decision, Retry) else "park"
        self.events.append(("fail", run.attempt, decision))

    async def after_settle(self, run: JobRun) -> None:
        assert run.settled is not None
        self.events.append(("settled", run.attempt, run.settled.outcome.value))


async def test_a_user_middleware_sees_start_fail_start_complete(env: Env) -> None:
    recorder = Recorder()
    app = App(unique("mw"), middleware=[recorder])
    hooks: list[tuple[str, int]] = []
    app.on("start", lambda run: hooks.append(("start", run.attempt)))
    app.on("fail", lambda run: hooks.append(("fail", run.attempt)))
    app.on("complete", lambda run: hooks.append(("complete", run.attempt)))
    attempts: list[int] = []

    @app.handler(Step, retry=QUICK_RETRY)
    async def flaky(step: Step) -> None:
        attempts.append(step.n)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")

    async with running(worker_for(app, env), env):
        async with publisher_for(app, env) as publisher:
            await publisher.publish(Step(n=1))
        await env.until(lambda: ("complete", 2) in hooks)

    assert recorder.events == [
        ("start", 1, "contract.step"),
        ("fail", 1, "retry"),
        ("settled", 1, "retried"),
        ("start", 2, "contract.step"),
        ("settled", 2, "completed"),
    ]
    assert hooks == [("start", 1), ("fail", 1), ("start", 2), ("complete", 2)]


class Gate(Middleware):
    """Flow control as middleware, answering for the handler: a duplicate of a job already done
    is skipped, job 2 meets an open circuit once, job 3 is refused."""

    def __init__(self) -> None:
        self.done: set[str] = set()

    async def before_handler(self, run: JobRun) -> None:
        assert isinstance(run.job, Step)
        if run.job_id in self.done:
            raise SkipJob("a duplicate of a job already done")
        if run.job.n == 2 and run.attempt == 1:
            raise RetryLater("circuit open", delay=0.2)
        if run.job.n == 3:
            raise PermanentFailure("refused by policy")

    async def after_success(self, run: JobRun) -> None:
        self.done.add(run.job_id)


async def test_a_middleware_answers_for_the_handler_skip_retry_later_or_park(env: Env) -> None:
    later = Recorder()  # after the gate: its before_handler runs only where the gate let it pass
    app = App(unique("gate"), middleware=[Gate(), later])
    ran: list[tuple[int, int]] = []

    @app.handler(Step, retry=QUICK_RETRY)
    async def handle(step: Step) -> None:
        ran.append((step.n, current_job().attempt))

    def settled(n: int) -> list[tuple[str, int, str]]:
        return [e for e in later.events if e[0] == "settled"][:n]

    async with running(worker_for(app, env), env), publisher_for(app, env) as publisher:
        first = await publisher.publish(Step(n=1))
        await env.until(lambda: len(settled(1)) == 1)
        await publisher.publish(Step(n=1), job_id=first)  # the same job again
        await publisher.publish(Step(n=2))
        await publisher.publish(Step(n=3))
        await env.until(lambda: len(settled(5)) == 5)

    assert sorted(ran) == [(1, 1), (2, 2)]  # never for the duplicate, the open circuit or job 3
    outcomes = sorted(e[1:] for e in later.events if e[0] == "settled")
    assert outcomes == [(1, "completed"), (1, "completed"), (1, "parked"), (1, "retried"),
                        (2, "completed")]  # fmt: skip
    starts = [e for e in later.events if e[0] == "start"]
    assert starts == [("start", 1, "contract.step"), ("start", 2, "contract.step")]


async def test_the_slow_job_alert_fires_while_the_job_still_runs(env: Env) -> None:
    alerts: list[SlowJob] = []
    release = asyncio.Event()
    finished: list[int] = []
    app = App(unique("slow"), on_slow_job=alerts.append)

    @app.handler(Step, slow_after=0.2)
    async def slow(step: Step) -> None:
        await asyncio.wait_for(release.wait(), 30)
        finished.append(step.n)

    async with running(worker_for(app, env), env):
        async with publisher_for(app, env) as publisher:
            job_id = await publisher.publish(Step(n=7))
        await env.until(lambda: bool(alerts))
        assert finished == []  # the alert came while the handler was still running
        release.set()
        await env.until(lambda: finished == [7])

    (alert,) = alerts
    assert (alert.job_id, alert.job_name, alert.attempt) == (job_id, "contract.step", 1)
    assert alert.running_for >= 0.2 and alert.threshold == 0.2


async def test_the_worker_reconnects_after_a_lost_connection(env: Env) -> None:
    app = App(unique("reconnect"))
    seen: list[int] = []

    @app.handler(Step)
    async def handle(step: Step) -> None:
        seen.append(step.n)

    worker = worker_for(app, env)
    async with running(worker, env), publisher_for(app, env) as publisher:
        await publisher.publish(Step(n=1))
        await env.until(lambda: seen == [1])
        await env.drop_connections()
        await env.until(lambda: worker.reconnects >= 1 and worker.ready)
        await publisher.publish(Step(n=2))  # the publisher reconnects too
        await env.until(lambda: 2 in seen)
    # At least once: job 1's coalesced ack may not have reached the broker before the cut.
    assert set(seen) == {1, 2} and seen.count(2) == 1


async def test_parked_jobs_are_listed_replayed_and_purged(env: Env) -> None:
    app = App(unique("park"))
    fixed = False
    done: list[int] = []

    @app.handler(Step, retry=RetryPolicy(delays=(0.1,), max_attempts=1))
    async def handle(step: Step) -> None:
        if not fixed:
            raise ValueError(f"cannot do {step.n}")
        done.append(step.n)

    queue = f"{app.name}.contract.step"
    async with running(worker_for(app, env), env):
        async with publisher_for(app, env) as publisher:
            ids = await publisher.publish_many([Step(n=1), Step(n=2), Step(n=3)])
        async with ParkingLot(env.settings, queue, broker=env.broker) as lot:

            async def all_parked() -> bool:
                return len((await lot.list()).jobs) == 3

            await env.until(all_parked)
            listed = (await lot.list()).jobs
            assert sorted(p.job_id for p in listed) == sorted(ids)
            assert {p.error_type for p in listed} == {"builtins.ValueError"}
            fixed = True
            report = await lot.replay(Selection(ids=frozenset(ids[:2])))
            assert report.replayed == 2
            await env.until(lambda: sorted(done) == [1, 2])
            purged = await lot.purge()
            assert purged.purged == 1
            assert (await lot.list()).jobs == []


@job("contract.tick")
class Tick(BaseModel):
    pass


async def test_the_scheduler_leader_hands_over_when_it_stops(env: Env) -> None:
    app = App(unique("sched"))
    ticks: list[str] = []

    @app.handler(Tick)
    async def tick(_: Tick) -> None:
        ticks.append("tick")

    app.schedule(Tick(), every=timedelta(seconds=1))
    env.track(app)
    first = Scheduler(app, env.settings, broker=env.broker, refresh_interval=1.0)
    second = Scheduler(app, env.settings, broker=env.broker, refresh_interval=1.0)
    runs = [asyncio.create_task(first.run())]
    try:
        await env.until(lambda: first.is_leader)
        runs.append(asyncio.create_task(second.run()))
        await env.until(lambda: second.reconnects == 0 and not second.is_leader)
        first.stop()
        await asyncio.wait_for(runs[0], 30)
        await env.until(lambda: second.is_leader)
    finally:
        first.stop()
        second.stop()
        await asyncio.wait_for(asyncio.gather(*runs), 30)


async def test_status_events_reach_the_tracker(env: Env) -> None:
    app = App(unique("status"), track_status=True)

    @app.handler(Step)
    async def handle(step: Step) -> int:
        return step.n * 10

    tracker = StatusTracker(env.settings, exchange=app.exchange, broker=env.broker)
    async with running(worker_for(app, env), env), tracker:
        async with publisher_for(app, env) as publisher:
            job_id = await publisher.publish(Step(n=4))

        async def final() -> bool:
            status = await tracker.get(job_id)
            return status is not None and status.final

        await env.until(final)
        status = await tracker.get(job_id)
        assert status is not None
        assert (status.state, status.result, status.attempt) == ("completed", 40, 1)


class Layer(Middleware):
    """Records which points of one delivery reached it."""

    def __init__(self, name: str, seen: list[str], answer: Exception | None = None) -> None:
        self.name, self.seen, self.answer = name, seen, answer

    async def before_handler(self, run: JobRun) -> None:
        self.seen.append(f"{self.name}.before")
        if self.answer is not None:
            raise self.answer

    async def after_success(self, run: JobRun) -> None:
        self.seen.append(f"{self.name}.success")

    async def after_failure(self, run: JobRun) -> None:
        self.seen.append(f"{self.name}.failure")

    async def after_settle(self, run: JobRun) -> None:
        self.seen.append(f"{self.name}.settle")


@pytest.mark.parametrize("answer", [SkipJob("duplicate"), PermanentFailure("refused")])
async def test_layers_after_the_answering_one_never_see_the_job_but_all_see_it_settle(
    env: Env, answer: Exception
) -> None:
    seen: list[str] = []
    outer, gate, inner = Layer("outer", seen), Layer("gate", seen, answer), Layer("inner", seen)
    app = App(unique("layers"), middleware=[outer, gate, inner])
    ran: list[int] = []

    @app.handler(Step)
    async def handle(step: Step) -> None:
        ran.append(step.n)

    async with running(worker_for(app, env), env), publisher_for(app, env) as publisher:
        await publisher.publish(Step(n=1))
        await env.until(lambda: "outer.settle" in seen)

    after = "success" if isinstance(answer, SkipJob) else "failure"
    assert ran == []
    assert seen == ["outer.before", "gate.before", f"gate.{after}", f"outer.{after}",
                    "inner.settle", "gate.settle", "outer.settle"]  # fmt: skip


async def test_a_skipped_duplicate_leaves_the_tracked_result_of_the_job_it_duplicates(
    env: Env,
) -> None:
    gate, seen = Gate(), list[str]()
    app = App(unique("skipstatus"), track_status=True, middleware=[Layer("outer", seen), gate])

    @app.handler(Step)
    async def handle(step: Step) -> int:
        return step.n * 10

    tracker = StatusTracker(env.settings, exchange=app.exchange, broker=env.broker)
    async with running(worker_for(app, env), env), tracker, publisher_for(app, env) as publisher:
        job_id = await publisher.publish(Step(n=4))
        await env.until(lambda: job_id in gate.done)
        await publisher.publish(Step(n=4), job_id=job_id)  # skipped by the gate
        await env.until(lambda: seen.count("outer.settle") == 2)
        # Emitted after the duplicate's event, on the same channel: once it is in, so is that.
        skipped = "never-done-" + job_id
        gate.done.add(skipped)  # a job the gate skips with no earlier completion
        await publisher.publish(Step(n=5), job_id=skipped)

        async def skip_seen() -> bool:
            status = await tracker.get(skipped)
            return status is not None and status.final

        await env.until(skip_seen)
        kept, only_skipped = await tracker.get(job_id), await tracker.get(skipped)
    assert kept is not None and (kept.state, kept.result, kept.skipped) == ("completed", 40, False)
    assert only_skipped is not None and only_skipped.skipped and only_skipped.result is None
    assert only_skipped.message == "a duplicate of a job already done"
