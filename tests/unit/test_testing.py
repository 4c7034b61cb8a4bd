"""TestBroker: the real consumer, settlement and retry policy on in-memory queues, no RabbitMQ.

Routing, retries and parking here; delivery, the publisher and the docs' examples in
``test_testing_delivery``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from pydantic import BaseModel

from brokerjobs import App, PermanentFailure, RetryLater, UnroutableJob, job
from brokerjobs import envelope as wire
from brokerjobs.context import current_job
from brokerjobs.testing import TestBroker
from tests.support.sms_jobs import SendSms, sms_app


@job("order.created")
class OrderCreated(BaseModel):
    order_id: int


@job("order.item.added")
class ItemAdded(BaseModel):
    order_id: int
    sku: str


async def test_topic_patterns_route_a_job_to_every_matching_queue_and_nowhere_else() -> None:
    app = App("shop")
    seen: list[tuple[str, str]] = []
    for queue, patterns in {
        "shop.star": ("order.*",),
        "shop.hash": ("order.#",),
        "shop.created": ("*.created", "order.created"),  # two patterns, still one copy
        "shop.invoices": ("invoice.#",),
    }.items():
        app.queue(queue, *patterns)
    routes: list[tuple[str, type[BaseModel]]] = [
        ("shop.star", OrderCreated),
        ("shop.hash", OrderCreated),
        ("shop.hash", ItemAdded),
        ("shop.created", OrderCreated),
    ]
    for queue, job_type in routes:
        app.handler(job_type, queue=queue)(_recorder(seen, queue))

    async with TestBroker(app) as broker:
        await broker.publish(OrderCreated(order_id=1))
        await broker.publish(ItemAdded(order_id=1, sku="x"))
        await broker.run_until_idle()

    assert sorted(seen) == [
        ("shop.created", "order.created"),
        ("shop.hash", "order.created"),
        ("shop.hash", "order.item.added"),
        ("shop.star", "order.created"),
    ]
    assert broker.completed(OrderCreated, queue="shop.star") == [OrderCreated(order_id=1)]
    assert broker.queue_depths()["shop.invoices"] == 0


def _recorder(seen: list[tuple[str, str]], queue: str) -> Callable[[BaseModel], Awaitable[None]]:
    async def handle(task: BaseModel) -> None:
        seen.append((queue, current_job().job_name))

    return handle


async def test_a_failed_job_waits_in_its_retry_tier_on_the_virtual_clock_then_succeeds() -> None:
    app = sms_app()
    attempts: list[int] = []

    @app.handler(SendSms, queue="t.sms")
    async def send(task: SendSms) -> None:
        attempts.append(current_job().attempt)
        if current_job().attempt == 1:
            raise ConnectionError("gateway down")

    async with TestBroker(app) as broker:
        job_id = await broker.publish(SendSms(to="+1"))
        await broker.run_until_idle(advance_clock=False)
        assert attempts == [1]
        assert broker.queue_depths()["t.sms.retry.1s"] == 1
        await broker.advance(0.999)
        assert attempts == [1]
        await broker.advance(0.001)
        assert attempts == [1, 2]

    assert [(o.attempt, o.action, o.at) for o in broker.outcomes] == [
        (1, "retried", 0.0),
        (2, "completed", 1.0),
    ]
    assert {o.job_id for o in broker.outcomes} == {job_id}
    assert broker.completed(SendSms) == [SendSms(to="+1")]
    # The retry came back through the broker's dead-lettering, x-death and all.
    retried = broker.outcomes[1].delivery
    assert (retried.exchange, retried.routing_key) == ("", "t.sms")
    assert retried.headers["x-death"][0]["queue"] == "t.sms.retry.1s"
    assert retried.headers["x-death"][0]["reason"] == "expired"


async def test_exhausted_attempts_park_exactly_one_copy_with_the_failure_envelope() -> None:
    app = sms_app()
    attempts: list[int] = []

    @app.handler(SendSms, queue="t.sms")
    async def always_fails(task: SendSms) -> None:
        attempts.append(current_job().attempt)
        raise ValueError(f"number {task.to} is blocked")

    async with TestBroker(app) as broker:
        job_id = await broker.publish(SendSms(to="+5"))
        await broker.run_until_idle()

    assert attempts == [1, 2, 3]
    assert broker.now == 11.0  # 1 s + 10 s of retry tiers, no real waiting
    [parked] = broker.parked("t.sms")
    headers = parked.delivery.headers
    assert parked.job_id == job_id
    assert parked.attempts == 3
    assert headers[wire.PARK_REASON].startswith("gave up after 3 attempts: ValueError: number")
    assert headers[wire.ERROR_TYPE] == "builtins.ValueError"
    assert "Traceback" in headers[wire.ERROR_TRACEBACK]
    assert headers[wire.ORIGIN_EXCHANGE] == "t"
    assert headers[wire.ORIGIN_ROUTING_KEY] == "sms.send"
    assert headers[wire.ORIGIN_QUEUE] == "t.sms"
    assert not any(key.startswith("x-") for key in headers)  # settlement strips broker headers
    depths = broker.queue_depths()
    assert depths.pop("t.sms.parked") == 1
    assert set(depths.values()) == {0}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b'{"to": ', "malformed JSON", id="malformed"),
        pytest.param(b'{"to": 5}', "does not match SendSms", id="wrong-schema"),
        pytest.param(b'{"to": "\xff"}', "not valid UTF-8", id="non-utf8"),
    ],
)
async def test_a_poison_body_is_parked_at_once_without_running_the_handler(
    body: bytes, reason: str
) -> None:
    app = sms_app()
    handled: list[SendSms] = []

    @app.handler(SendSms, queue="t.sms")
    async def send(task: SendSms) -> None:
        handled.append(task)

    async with TestBroker(app) as broker:
        await broker.publish_raw(body, "sms.send")
        await broker.publish(SendSms(to="+1"))
        await broker.run_until_idle()

    assert handled == [SendSms(to="+1")]
    [parked] = broker.parked("t.sms")
    assert reason in parked.delivery.headers[wire.PARK_REASON]
    assert parked.error_type == "undecodable"
    assert parked.attempts == 1


async def test_retry_later_waits_in_the_smallest_tier_at_least_as_long_as_asked() -> None:
    app = sms_app()
    runs: list[float] = []

    @app.handler(SendSms, queue="t.sms")
    async def busy_once(task: SendSms) -> None:
        runs.append(broker.now)
        if len(runs) == 1:
            raise RetryLater("carrier busy", delay=20)  # tiers 1 s, 10 s, 60 s: waits 60 s

    async with TestBroker(app) as broker:
        await broker.publish(SendSms(to="+1"))
        await broker.advance(59.9)
        assert broker.queue_depths()["t.sms.retry.1m"] == 1
        assert runs == [0.0]
        await broker.advance(0.1)

    assert runs == [0.0, 60.0]
    assert broker.outcomes[0].retry_delay == 60.0


async def test_a_permanent_failure_parks_at_once() -> None:
    app = sms_app()

    @app.handler(SendSms, queue="t.sms")
    async def reject(task: SendSms) -> None:
        raise PermanentFailure("number does not exist")

    async with TestBroker(app) as broker:
        await broker.publish(SendSms(to="+0"))
        await broker.run_until_idle()

    assert [o.action for o in broker.outcomes] == ["parked"]
    assert broker.parked("t.sms")[0].error == "number does not exist"


async def test_an_unroutable_job_raises_like_the_real_publisher() -> None:
    app = sms_app()

    @app.handler(SendSms, queue="t.sms")
    async def send(task: SendSms) -> None: ...

    async with TestBroker(app) as broker:
        with pytest.raises(UnroutableJob, match="'order.created'"):
            await broker.publish(OrderCreated(order_id=1))
        with pytest.raises(UnroutableJob):
            await broker.publish_raw(b"{}", "t.nowhere", exchange="")
    assert set(broker.queue_depths().values()) == {0}
