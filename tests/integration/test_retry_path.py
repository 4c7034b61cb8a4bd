"""Delayed retries through tier queues, and parking after the last attempt."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel

from brokerjobs import App, Publisher, RetryLater, RetryPolicy, current_job, job
from brokerjobs import envelope as wire
from brokerjobs.broker.amqp import Channel
from brokerjobs.provision import declare
from tests.support.broker import Broker, make_settings, running_worker, unique, wait_for


@job("sms.send", retry=RetryPolicy(delays=(1.0, 30.0), max_attempts=3))
class SendSms(BaseModel):
    n: int


async def test_a_1s_retry_is_not_held_back_by_a_30s_retry_queued_before_it(broker: Broker) -> None:
    app = App(unique("hol"))
    runs: dict[int, list[float]] = {1: [], 2: []}

    @app.handler(SendSms)
    async def send(task: SendSms) -> None:
        runs[task.n].append(time.monotonic())
        if len(runs[task.n]) == 1:
            raise RetryLater("carrier busy", delay=30.0 if task.n == 1 else 1.0)

    broker.track(app)
    async with running_worker(app, make_settings(prefetch=1)):
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            await publisher.publish(SendSms(n=1))
            await wait_for(lambda: len(runs[1]) == 1)
            await publisher.publish(SendSms(n=2))
        await wait_for(lambda: len(runs[2]) == 2, timeout=10)
    gap = runs[2][1] - runs[2][0]
    assert 0.9 <= gap < 3.0, gap
    assert len(runs[1]) == 1  # still waiting in the 30 s tier
    assert await broker.depth(f"{app.name}.sms.send.retry.30s") == 1


async def test_retries_of_one_queue_never_reach_another_queue_bound_to_the_same_key(
    broker: Broker,
) -> None:
    app = App(unique("nodup"))
    calls = {"flaky": 0, "steady": 0}
    app.queue(f"{app.name}.flaky", "sms.send")
    app.queue(f"{app.name}.steady", "sms.send")

    @app.handler(SendSms, queue=f"{app.name}.flaky", retry=RetryPolicy(delays=(0.2,)))
    async def flaky(task: SendSms) -> None:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionError("gateway down")

    @app.handler(SendSms, queue=f"{app.name}.steady")
    async def steady(task: SendSms) -> None:
        calls["steady"] += 1

    broker.track(app)
    async with running_worker(app):
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            await publisher.publish(SendSms(n=1))
        await wait_for(lambda: calls["flaky"] == 3, timeout=10)
        # give a stray duplicate every chance to arrive before counting
        await asyncio.sleep(0.5)
    assert calls == {"flaky": 3, "steady": 1}


async def test_exhausted_attempts_park_exactly_one_copy_with_the_failure_envelope(
    broker: Broker,
) -> None:
    app = App(unique("park"))
    attempts: list[int] = []

    @app.handler(SendSms, retry=RetryPolicy(delays=(0.1, 0.2), max_attempts=3))
    async def always_fails(task: SendSms) -> None:
        attempts.append(current_job().attempt)
        raise ValueError(f"number {task.n} is blocked")

    broker.track(app)
    parked_queue = f"{app.name}.sms.send.parked"
    async with running_worker(app):
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            job_id = await publisher.publish(SendSms(n=5))
        await wait_for(lambda: broker.depth_is(parked_queue, 1), timeout=10)
        await asyncio.sleep(0.3)  # a second copy would show up by now
    assert attempts == [1, 2, 3]
    [parked] = await broker.drain(parked_queue)
    headers = parked.headers
    assert parked.message_id == job_id
    assert parked.body == b'{"n":5}'
    assert headers[wire.ATTEMPT] == 3
    assert headers[wire.ERROR_TYPE] == "builtins.ValueError"
    assert headers[wire.ERROR_MESSAGE] == "ValueError: number 5 is blocked"
    assert "gave up after 3 attempts" in headers[wire.PARK_REASON]
    assert "Traceback" in headers[wire.ERROR_TRACEBACK]
    assert headers[wire.ORIGIN_EXCHANGE] == app.exchange
    assert headers[wire.ORIGIN_ROUTING_KEY] == "sms.send"
    assert headers[wire.ORIGIN_QUEUE] == f"{app.name}.sms.send"
    assert headers[wire.FIRST_FAILED_AT] <= headers[wire.LAST_FAILED_AT]
    assert wire.PARKED_AT in headers and wire.WORKER in headers
    assert not any(k.startswith("x-death") for k in headers)


async def test_a_crash_between_the_retry_publish_and_the_ack_loses_nothing(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = App(unique("crash"))
    attempts: list[int] = []

    @app.handler(SendSms, retry=RetryPolicy(delays=(0.2,), max_attempts=5))
    async def fails_once(task: SendSms) -> None:
        attempts.append(current_job().attempt)
        if len(attempts) == 1:
            raise ConnectionError("first try fails")

    crashed = asyncio.Event()

    # Simulate the crash: the retry copy is confirmed, then the channel dies before the ack.
    async def publish_then_die(
        self: Channel, message: wire.OutgoingMessage, exchange: str, routing_key: str
    ) -> None:
        await real_publish(self, message, exchange, routing_key)
        if not crashed.is_set():
            crashed.set()
            await self.close()

    real_publish = Channel.publish
    monkeypatch.setattr(Channel, "publish", publish_then_die)
    broker.track(app)
    await declare(broker.connection, app.topology())
    await real_publish(
        await broker.fresh_channel(), wire.encode(SendSms(n=1)), app.exchange, "sms.send"
    )
    async with running_worker(app) as worker:
        await wait_for(lambda: crashed.is_set() and worker.reconnects >= 1, timeout=10)
        # the redelivered original AND the retry copy both run: a duplicate, never a loss
        await wait_for(lambda: len(attempts) >= 3, timeout=10)
    assert sorted(attempts) == [1, 1, 2]


@job("sms.slow")
class SlowSms(BaseModel):
    n: int


async def test_a_job_past_its_timeout_is_retried_and_then_parked_as_a_timeout(
    broker: Broker,
) -> None:
    app = App(unique("timeout"))
    started: list[int] = []

    @app.handler(SlowSms, timeout=0.2, retry=RetryPolicy(delays=(0.1,), max_attempts=2))
    async def hangs(task: SlowSms) -> None:
        started.append(current_job().attempt)
        await asyncio.Event().wait()

    broker.track(app)
    parked_queue = f"{app.name}.sms.slow.parked"
    async with running_worker(app) as worker:
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            await publisher.publish(SlowSms(n=1))
        await wait_for(lambda: broker.depth_is(parked_queue, 1), timeout=10)
        assert worker.ready
    [parked] = await broker.drain(parked_queue)
    assert started == [1, 2]
    assert parked.headers[wire.ERROR_TYPE] == "Timeout"
    assert "timed out after 0.2s" in parked.headers[wire.PARK_REASON]


async def test_a_deleted_retry_tier_is_declared_again_and_the_failing_job_is_not_lost(
    broker: Broker,
) -> None:
    app = App(unique("tiergone"))
    attempts: list[int] = []

    @app.handler(SlowSms, retry=RetryPolicy(delays=(0.1,), max_attempts=3))
    async def fails_once(task: SlowSms) -> None:
        attempts.append(current_job().attempt)
        if current_job().attempt == 1:
            raise ConnectionError("first attempt fails")

    broker.track(app)
    async with running_worker(app) as worker:
        channel = await broker.fresh_channel()
        await channel.delete_queue(f"{app.name}.sms.slow.retry.100ms")
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            await publisher.publish(SlowSms(n=1))
        await wait_for(lambda: attempts[-1:] == [2], timeout=15)
        assert worker.reconnects >= 1
    # the retry copy was unroutable: the original was requeued and ran again, then retried
    assert attempts == [1, 1, 2]
