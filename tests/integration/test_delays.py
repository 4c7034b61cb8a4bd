"""Delayed publishing through binary delay levels: in the broker, no plugin, no blocking."""

from __future__ import annotations

import time

from pydantic import BaseModel

from brokerjobs import App, Publisher, job
from tests.support.broker import Broker, make_settings, running_worker, unique, wait_for


@job("reminder.send")
class SendReminder(BaseModel):
    text: str


async def test_a_3s_delay_is_not_held_back_by_a_1h_delay_published_before_it(
    broker: Broker,
) -> None:
    app = App(unique("delay"), delay_levels=13)
    arrived: dict[str, float] = {}

    @app.handler(SendReminder)
    async def remind(task: SendReminder) -> None:
        arrived[task.text] = time.monotonic()

    broker.track(app)
    async with running_worker(app):
        async with Publisher.for_app(app, make_settings()) as publisher:
            await publisher.publish(SendReminder(text="in an hour"), delay=3600)
            sent = time.monotonic()
            await publisher.publish(SendReminder(text="in 3 seconds"), delay=3)
            await publisher.publish(SendReminder(text="now"))
        await wait_for(lambda: "in 3 seconds" in arrived, timeout=10)
    assert 2.9 <= arrived["in 3 seconds"] - sent < 4.0
    assert arrived["now"] - sent < 1.0
    assert "in an hour" not in arrived
    # 3600 = 2048 + 1024 + 512 + 16: it waits at the highest of its levels
    assert await broker.depth(f"{app.exchange}.delay.11.2048s") == 1


async def test_a_delayed_job_reaches_every_queue_bound_to_it_exactly_once(broker: Broker) -> None:
    app = App(unique("delayfan"), delay_levels=4)
    app.queue(f"{app.name}.a", "reminder.*")
    app.queue(f"{app.name}.b", "reminder.send")
    got: list[str] = []

    @app.handler(SendReminder, queue=f"{app.name}.a")
    async def on_a(task: SendReminder) -> None:
        got.append("a")

    @app.handler(SendReminder, queue=f"{app.name}.b")
    async def on_b(task: SendReminder) -> None:
        got.append("b")

    broker.track(app)
    async with running_worker(app):
        async with Publisher.for_app(app, make_settings()) as publisher:
            await publisher.publish(SendReminder(text="x"), delay=1)
        await wait_for(lambda: len(got) == 2, timeout=10)
    assert sorted(got) == ["a", "b"]
