"""Readiness tells the truth: connected is not enough, the worker must make progress.

Two ways a connected worker stops making progress: a delivery held long past its job timeout
(a handler that swallows its cancellation), and sessions that die within seconds, one after the
other. Both turn ``/readyz`` to 503 with the reason in its body, and back to 200 on recovery.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from brokerjobs import App, job
from brokerjobs.publisher import Publisher
from tests.support.broker import TEST_URL, Broker, make_settings, running_worker, unique, wait_for
from tests.support.proxy import TcpProxy


@job("progress.stubborn")
class Stubborn(BaseModel):
    n: int


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def status_of(port: int) -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(readyz, port)


async def test_a_delivery_held_past_its_timeout_makes_the_worker_not_ready(broker: Broker) -> None:
    app = App(unique("progress"))
    release = asyncio.Event()

    @app.handler(Stubborn, timeout=0.5)
    async def stubborn(task: Stubborn) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # a handler that will not be stopped
            await release.wait()

    broker.track(app)

    settings = make_settings(health_port=0, confirm_timeout=1.0)
    async with running_worker(app, settings) as worker:
        port = worker.health_port
        assert port is not None
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            await publisher.publish(Stubborn(n=1))
        # Not ready within job timeout (0.5 s) + confirm timeout (1 s) + 5 s of margin.
        await wait_for(lambda: not worker.ready, timeout=15)
        code, body = await status_of(port)
        release.set()
        await wait_for(lambda: worker.ready, timeout=10)
        assert (await status_of(port))[0] == 200
    assert code == 503
    assert any("held" in str(p) for p in body["problems"]), body


async def test_sessions_that_die_within_seconds_make_the_worker_not_ready(broker: Broker) -> None:
    app = App(unique("progress"))

    @app.handler(Stubborn)
    async def handle(task: Stubborn) -> None: ...

    broker.track(app)

    upstream = urlsplit(TEST_URL)
    async with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 5672) as proxy:
        settings = make_settings(url=proxy.url_for(TEST_URL), health_port=0)
        async with running_worker(app, settings) as worker:
            worker.stable_session_s = 3.0
            for cut in range(3):
                await wait_for(lambda: worker.ready or worker.short_sessions >= 3, timeout=20)
                proxy.cut()

                def reconnected(n: int = cut) -> bool:
                    return worker.reconnects > n

                await wait_for(reconnected, timeout=20)
            await wait_for(lambda: worker.problems() != [] and worker._session is not None, 20)
            problems = worker.problems()
            # The fourth session lives on: after stable_session_s the worker is ready again.
            await wait_for(lambda: worker.ready, timeout=20)
    assert worker.short_sessions >= 3
    assert any("reconnecting in a loop" in p for p in problems), problems
