"""TestBroker delivery: priority and prefetch, sync handlers, timeouts, replay, delays, the
publisher handed to code under test, status tracking; and the docs' examples run as written.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from pathlib import Path

from brokerjobs import App, RetryPolicy
from brokerjobs import envelope as wire
from brokerjobs.context import current_job
from brokerjobs.publisher import Publisher
from brokerjobs.testing import TestBroker
from tests.support.sms_jobs import SendSms, sms_app

ROOT = Path(__file__).resolve().parents[2]


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
