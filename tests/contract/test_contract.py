"""The same scenarios against TestBroker and against RabbitMQ: the fake must behave like the broker.

Each test runs twice, ``[memory]`` and ``[rabbitmq]``, with identical assertions. Retry delays
are short so the real broker's run stays quick; in memory they take no time at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from pydantic import BaseModel

from brokerjobs import App, PermanentFailure, RetryLater, RetryPolicy, UnroutableJob, job
from brokerjobs import envelope as wire
from brokerjobs.context import current_job
from tests.contract.harness import Harness, MemoryHarness, RabbitHarness, Run
from tests.support.broker import own_headers
from tests.support.matrix import delivery_order

# What an operator finds on a job parked after its last attempt, and on poison input.
PARKED_AFTER_FAILURES = {
    wire.ATTEMPT,
    wire.SCHEMA_VERSION,
    wire.ORIGIN_EXCHANGE,
    wire.ORIGIN_ROUTING_KEY,
    wire.ORIGIN_QUEUE,
    wire.FIRST_FAILED_AT,
    wire.LAST_FAILED_AT,
    wire.ERROR_TYPE,
    wire.ERROR_MESSAGE,
    wire.ERROR_TRACEBACK,
    wire.PARK_REASON,
    wire.PARKED_AT,
    wire.WORKER,
}
PARKED_POISON = PARKED_AFTER_FAILURES - {wire.SCHEMA_VERSION, wire.ERROR_TRACEBACK}


@pytest.fixture(params=["memory", "rabbitmq"])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "memory":
        return MemoryHarness()
    request.getfixturevalue("_require_broker")  # fails, never skips, without RabbitMQ
    return RabbitHarness()


@job("order.created")
class OrderCreated(BaseModel):
    order_id: int


@job("order.item.added")
class ItemAdded(BaseModel):
    order_id: int


@job("sms.send")
class SendSms(BaseModel):
    to: str


FAST = RetryPolicy(delays=(0.1, 0.2), max_attempts=3)


def sms_queue(app: App, prefetch: int | None = None, max_priority: int | None = None) -> str:
    return app.queue(f"{app.name}.sms", "sms.*", prefetch=prefetch, max_priority=max_priority).name


async def test_topic_patterns_deliver_a_job_once_to_every_matching_queue(harness: Harness) -> None:
    app = harness.app("routing")
    seen: list[tuple[str, str]] = []
    star = app.queue(f"{app.name}.star", "order.*")
    deep = app.queue(f"{app.name}.deep", "order.#")
    created = app.queue(f"{app.name}.created", "*.created", "order.created")

    def record(label: str) -> Callable[[BaseModel], Awaitable[None]]:
        async def handle(task: BaseModel) -> None:
            seen.append((label, current_job().job_name))

        return handle

    app.handler(OrderCreated, queue=star)(record("star"))
    app.handler(OrderCreated, queue=deep)(record("deep"))
    app.handler(ItemAdded, queue=deep)(record("deep"))
    app.handler(OrderCreated, queue=created)(record("created"))

    async with harness.run(app) as run:
        await run.publish(OrderCreated(order_id=1))
        await run.publish(ItemAdded(order_id=1))
        await run.settle(lambda: len(seen) >= 4)

    assert sorted(seen) == [
        ("created", "order.created"),
        ("deep", "order.created"),
        ("deep", "order.item.added"),
        ("star", "order.created"),
    ]


async def test_a_failed_job_is_retried_and_then_succeeds(harness: Harness) -> None:
    app = harness.app("retry")
    attempts: list[int] = []

    @app.handler(SendSms, queue=sms_queue(app), retry=FAST)
    async def fails_once(task: SendSms) -> None:
        attempts.append(current_job().attempt)
        if current_job().attempt == 1:
            raise ConnectionError("gateway down")

    async with harness.run(app) as run:
        await run.publish(SendSms(to="+1"))
        await run.settle(lambda: len(attempts) >= 2)

    assert attempts == [1, 2]


async def test_exhausted_attempts_park_one_copy_with_the_same_envelope(harness: Harness) -> None:
    app = harness.app("park")
    queue = sms_queue(app)
    attempts: list[int] = []

    @app.handler(SendSms, queue=queue, retry=FAST)
    async def always_fails(task: SendSms) -> None:
        attempts.append(current_job().attempt)
        raise ValueError("number blocked")

    async with harness.run(app) as run:
        job_id = await run.publish(SendSms(to="+5"))
        await run.settle(lambda: len(attempts) >= 3, parked={queue: 1})
        [parked] = await run.take_parked(queue)

    assert attempts == [1, 2, 3]
    delivery = parked.delivery
    assert set(own_headers(delivery.headers)) == PARKED_AFTER_FAILURES
    assert (delivery.exchange, delivery.routing_key) == ("", f"{queue}.parked")
    assert (delivery.message_id, delivery.job_name, delivery.body) == (
        job_id,
        "sms.send",
        b'{"to":"+5"}',
    )
    assert delivery.headers[wire.ATTEMPT] == 3
    assert delivery.headers[wire.ORIGIN_EXCHANGE] == app.exchange
    assert delivery.headers[wire.ORIGIN_QUEUE] == queue
    assert parked.error == "gave up after 3 attempts: ValueError: number blocked"


async def test_poison_input_is_parked_at_once_with_its_reason(harness: Harness) -> None:
    app = harness.app("poison")
    queue = sms_queue(app)
    handled: list[SendSms] = []

    @app.handler(SendSms, queue=queue, retry=FAST)
    async def send(task: SendSms) -> None:
        handled.append(task)

    async with harness.run(app) as run:
        await run.publish_raw(b'{"to": ', "sms.send")
        await run.publish(SendSms(to="+1"))
        await run.settle(lambda: len(handled) >= 1, parked={queue: 1})
        [parked] = await run.take_parked(queue)

    assert handled == [SendSms(to="+1")]
    assert set(own_headers(parked.delivery.headers)) == PARKED_POISON
    assert parked.error.startswith("malformed JSON")
    assert (parked.error_type, parked.attempts) == ("undecodable", 1)


async def test_retry_later_comes_back_after_the_smallest_tier_long_enough(harness: Harness) -> None:
    app = harness.app("later")
    runs: list[float] = []
    running: list[Run] = []  # handlers read the run's clock

    @app.handler(SendSms, queue=sms_queue(app), retry=RetryPolicy(delays=(0.1, 1.0)))
    async def busy_once(task: SendSms) -> None:
        runs.append(running[0].clock())
        if len(runs) == 1:
            raise RetryLater("carrier busy", delay=0.5)  # the 1 s tier, not the 0.1 s one

    async with harness.run(app) as run:
        running.append(run)
        await run.publish(SendSms(to="+1"))
        await run.settle(lambda: len(runs) >= 2)

    assert 1.0 <= runs[1] - runs[0] < 2.5


async def test_waiting_jobs_are_delivered_highest_priority_first(harness: Harness) -> None:
    """On a classic queue that asks for priorities 0-10 (so 50 counts as 10); on quorum queues,
    what the broker's version does (``tests.support.matrix.delivery_order``)."""
    app = harness.app("priority")
    order: list[str] = []
    queue = sms_queue(app, prefetch=1, max_priority=10)

    @app.handler(SendSms, queue=queue)
    async def send(task: SendSms) -> None:
        order.append(task.to)

    published = [("low", 1), ("high", 9), ("mid", 5), ("capped", 50)]
    async with harness.run(app) as run:
        for to, priority in published:
            await run.publish(SendSms(to=to), priority=priority)
        await run.settle(lambda: len(order) >= 4)
        version = run.broker_version

    kind = app.queues[queue].kind
    assert order == delivery_order(published, kind, app.max_priority(queue), version)
    if kind == "classic":
        assert order == ["capped", "high", "mid", "low"]


async def test_a_permanent_failure_parks_without_a_retry(harness: Harness) -> None:
    app = harness.app("permanent")
    queue = sms_queue(app)
    attempts: list[int] = []

    @app.handler(SendSms, queue=queue, retry=FAST)
    async def reject(task: SendSms) -> None:
        attempts.append(current_job().attempt)
        raise PermanentFailure("no such number")

    async with harness.run(app) as run:
        await run.publish(SendSms(to="+0"))
        await run.settle(lambda: len(attempts) >= 1, parked={queue: 1})
        [parked] = await run.take_parked(queue)

    assert attempts == [1]
    assert (parked.error, parked.error_type) == ("no such number", "PermanentFailure")


async def test_a_job_no_queue_is_bound_for_raises_unroutable(harness: Harness) -> None:
    app = harness.app("unroutable")

    @app.handler(SendSms, queue=sms_queue(app))
    async def send(task: SendSms) -> None: ...

    async with harness.run(app) as run:
        with pytest.raises(UnroutableJob):
            await run.publish(OrderCreated(order_id=1))


async def test_an_expired_retry_is_dead_lettered_to_its_own_queue_with_x_death(
    harness: Harness,
) -> None:
    app = harness.app("deadletter")
    queue = sms_queue(app)

    @app.handler(SendSms, queue=queue, retry=RetryPolicy(delays=(0.1,)))
    async def send(task: SendSms) -> None: ...

    tier = f"{queue}.retry.100ms"
    async with harness.run(app, consume=False) as run:
        message = wire.encode(SendSms(to="+1"))
        message.expiration_ms = 100  # as settlement sends a retry: the tier's TTL on the message
        await run.publish_to_queue(message, tier)
        [delivery] = await run.take(queue, 1)

    assert (delivery.exchange, delivery.routing_key, delivery.expiration) == ("", queue, None)
    [death] = delivery.headers["x-death"]
    assert set(death) == {
        "count",
        "exchange",
        "original-expiration",
        "queue",
        "reason",
        "routing-keys",
        "time",
    }
    assert (death["count"], death["reason"], death["queue"]) == (1, "expired", tier)
    assert (death["exchange"], death["routing-keys"], death["original-expiration"]) == (
        "",
        [tier],
        "100",
    )
    assert delivery.headers["x-first-death-queue"] == tier
    assert delivery.message_id == message.message_id
