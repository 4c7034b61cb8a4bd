"""TestBroker: the real consumer, settlement and retry policy on in-memory queues, no RabbitMQ."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

from brokerjobs import App, PermanentFailure, RetryLater, RetryPolicy, UnroutableJob, job
from brokerjobs import envelope as wire
from brokerjobs.context import current_job
from brokerjobs.publisher import Publisher
from brokerjobs.testing import TestBroker

ROOT = Path(__file__).resolve().parents[2]


@job("order.created")
class OrderCreated(BaseModel):
    order_id: int


@job("order.item.added")
class ItemAdded(BaseModel):
    order_id: int
    sku: str


@job("sms.send", retry=RetryPolicy(delays=(1.0, 10.0, 60.0), max_attempts=3))
class SendSms(BaseModel):
    to: str


def sms_app(name: str = "t") -> App:
    app = App(name)
    app.queue(f"{name}.sms", "sms.*")
    return app


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


async def test_waiting_jobs_are_delivered_by_priority_one_at_a_time_with_prefetch_1() -> None:
    app = App("t")
    app.queue("t.sms", "sms.*", prefetch=1, max_priority=10)
    order: list[str] = []

    @app.handler(SendSms, queue="t.sms")
    async def send(task: SendSms) -> None:
        order.append(task.to)

    async with TestBroker(app) as broker:
        for to, priority in [("low", 1), ("high", 9), ("mid", 5), ("capped", 200)]:
            await broker.publish(SendSms(to=to), priority=priority)
        await broker.run_until_idle()

    # x-max-priority=10 caps 200 at 10, as RabbitMQ does.
    assert order == ["capped", "high", "mid", "low"]


async def test_no_more_handlers_run_at_once_than_the_prefetch() -> None:
    app = App("t")
    app.queue("t.sms", "sms.*", prefetch=3)
    running = peak = 0

    @app.handler(SendSms, queue="t.sms")
    async def send(task: SendSms) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        for _ in range(3):
            await asyncio.sleep(0)
        running -= 1

    async with TestBroker(app) as broker:
        for n in range(10):
            await broker.publish(SendSms(to=str(n)))
        await broker.run_until_idle()

    assert peak == 3
    assert len(broker.completed(SendSms)) == 10


async def test_sync_handlers_run_in_the_thread_pool_with_the_job_context() -> None:
    app = sms_app()
    seen: list[tuple[str, int]] = []

    @app.handler(SendSms, queue="t.sms")
    def send(task: SendSms) -> None:
        seen.append((threading.current_thread().name, current_job().attempt))

    async with TestBroker(app) as broker:
        await broker.publish(SendSms(to="+1"))
        await broker.run_until_idle()

    [(thread, attempt)] = seen
    assert thread.startswith("bj-sync") and attempt == 1  # the worker's own thread pool


async def test_a_handler_past_its_timeout_is_retried_as_a_timeout() -> None:
    app = sms_app()

    @app.handler(SendSms, queue="t.sms", timeout=0.05, retry=RetryPolicy((1.0,), max_attempts=2))
    async def hangs(task: SendSms) -> None:
        await asyncio.Event().wait()

    async with TestBroker(app) as broker:
        await broker.publish(SendSms(to="+1"))
        await broker.run_until_idle()

    assert [(o.action, o.reason) for o in broker.outcomes] == [
        ("retried", "timed out after 0.05s"),
        ("parked", "gave up after 2 attempts: timed out after 0.05s"),
    ]


async def test_replay_sends_parked_jobs_back_to_their_queue_as_the_replay_tool_does() -> None:
    app = sms_app()
    fixed = False

    @app.handler(SendSms, queue="t.sms", retry=RetryPolicy((1.0,), max_attempts=1))
    async def send(task: SendSms) -> None:
        if not fixed:
            raise ConnectionError("misconfigured")

    async with TestBroker(app) as broker:
        await broker.publish(SendSms(to="+1"))
        await broker.run_until_idle()
        fixed = True
        assert await broker.replay("t.sms") == 1
        await broker.run_until_idle()

    assert broker.parked("t.sms") == []
    replayed = broker.outcomes[-1].delivery
    assert (replayed.attempt, replayed.headers[wire.REPLAYS]) == (1, 1)
    assert broker.completed(SendSms) == [SendSms(to="+1")]


async def test_delayed_publishing_waits_in_the_delay_levels_on_the_virtual_clock() -> None:
    app = App("t", delay_levels=4)
    app.queue("t.sms", "sms.*")
    runs: list[float] = []

    @app.handler(SendSms, queue="t.sms")
    async def send(task: SendSms) -> None:
        runs.append(broker.now)

    async with TestBroker(app) as broker:
        await broker.publish(SendSms(to="+1"), delay=4.5)  # rounded up: 4 s + 1 s levels
        await broker.advance(4.9)
        assert runs == []
        await broker.run_until_idle()

    assert runs == [5.0]


async def test_the_publisher_can_be_handed_to_the_code_under_test() -> None:
    app = sms_app()

    @app.handler(SendSms, queue="t.sms")
    async def send(task: SendSms) -> None: ...

    async def notify_all(publisher: Publisher, numbers: list[str]) -> None:  # "app code"
        await publisher.publish_many(SendSms(to=n) for n in numbers)

    async with TestBroker(app) as broker:
        await notify_all(broker.publisher, ["+1", "+2"])
        await broker.run_until_idle()

    assert broker.completed(SendSms) == [SendSms(to="+1"), SendSms(to="+2")]


async def test_status_tracking_apps_run_too() -> None:
    app = App("t", track_status=True)
    app.queue("t.sms", "sms.*")

    @app.handler(SendSms, queue="t.sms")
    async def send(task: SendSms) -> str:
        return "sent"

    async with TestBroker(app) as broker:
        await broker.publish(SendSms(to="+1"))
        await broker.run_until_idle()

    assert broker.completed(SendSms) == [SendSms(to="+1")]


def test_the_shop_example_passes_as_a_user_would_run_it() -> None:
    # examples/ is outside the test paths: run the example the way its docstring says.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "examples/test_shop_example.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b[1-9]\d* passed\b", result.stdout), result.stdout


def test_the_snippet_in_docs_testing_md_runs() -> None:
    text = (ROOT / "docs" / "testing.md").read_text()
    [snippet] = re.findall(r"```python\n# runnable\n(.*?)```", text, re.DOTALL)
    exec(compile(snippet, "docs/testing.md", "exec"), {"__name__": "docs_testing"})
