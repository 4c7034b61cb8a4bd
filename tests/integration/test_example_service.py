"""The thumbnails example service end to end: its HTTP API, its worker and the real broker.

POST -> 202 with a status URL -> status polls show progress -> completed with the result; bad
requests get 422; an image that fails every attempt ends parked and, once fixed, is replayed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from brokerjobs import App, RetryPolicy
from brokerjobs.parked import Selection
from brokerjobs.parking import ParkingLot
from examples.thumbnails.api import create_api
from examples.thumbnails.worker import Simulation, create_app, images_queue
from tests.support.broker import Broker, make_settings, running_worker, unique, wait_for

FAST_RETRY = RetryPolicy(delays=(0.1, 0.2), max_attempts=3)
Status = dict[str, Any]


def thumbnails_app(broker: Broker, simulation: Simulation) -> App:
    return broker.track(create_app(unique("thumbs"), simulation, retry=FAST_RETRY))


@contextlib.asynccontextmanager
async def api_client(broker: Broker, app: App) -> AsyncIterator[TestClient[Any, Any]]:
    """The aiohttp API for ``app`` on a test server in this event loop."""
    try:
        async with TestClient(TestServer(create_api(app, make_settings()))) as client:
            yield client
    finally:
        # broker.track() knows the app's exchange and queues, not its status exchange.
        with contextlib.suppress(Exception):
            await (await broker.fresh_channel()).delete_exchange(f"{app.exchange}.status")


async def submit(client: TestClient[Any, Any], body: object) -> tuple[str, str]:
    response = await client.post("/images", json=body)
    assert response.status == 202, await response.text()
    accepted = await response.json()
    job_id, status_url = accepted["job_id"], accepted["status_url"]
    assert status_url == f"/jobs/{job_id}"
    assert response.headers["Location"] == status_url
    return job_id, status_url


async def poll_until(
    client: TestClient[Any, Any],
    status_url: str,
    done: Callable[[Status], bool],
    seen: list[Status],
    timeout: float = 15,
) -> Status:
    """GET the status URL until ``done``; every answer is appended to ``seen``."""

    async def check() -> bool:
        response = await client.get(status_url)
        assert response.status == 200, await response.text()
        seen.append(await response.json())
        return done(seen[-1])

    await wait_for(check, timeout=timeout)
    return seen[-1]


async def test_upload_is_accepted_shows_progress_and_completes_with_the_result(
    broker: Broker,
) -> None:
    app = thumbnails_app(broker, Simulation(step_seconds=0.15))
    url = "https://images.example/uploads/cat.jpg"
    async with running_worker(app), api_client(broker, app) as client:
        job_id, status_url = await submit(client, {"url": url, "sizes": [256, 64, 64]})
        seen: list[Status] = []
        final = await poll_until(client, status_url, lambda s: s["state"] == "completed", seen)
        missing = await client.get("/jobs/0123456789abcdef")
        assert missing.status == 404

    # The first poll already found the job: it was marked waiting before it was published.
    assert seen[0]["state"] in ("waiting", "active")
    progress = [s["progress"] for s in seen if s["state"] == "active" and s["progress"]]
    assert progress == sorted(progress)
    assert {25.0, 50.0, 75.0} & set(progress), f"no intermediate progress in {progress}"
    stages = {25.0: "thumbnail", 50.0: "preview", 75.0: "metadata"}
    assert all(s["message"] == stages[s["progress"]] for s in seen if s["progress"] in stages)
    assert final["job_id"] == job_id
    assert (final["state"], final["attempt"], final["progress"], final["error"]) == (
        "completed",
        1,
        100.0,
        None,
    )
    result = final["result"]
    assert set(result["thumbnails"]) == {"64", "256"}
    assert result["preview"].endswith("/preview.jpg")
    assert result["metadata"]["source"] == url


async def test_bad_requests_get_422_and_good_ones_wait_in_the_queue_without_a_worker(
    broker: Broker,
) -> None:
    app = thumbnails_app(broker, Simulation(step_seconds=0.01))
    queue = images_queue(app)
    async with api_client(broker, app) as client:
        response = await client.post("/images", json={"url": "not a url", "sizes": [0, 64]})
        assert response.status == 422
        errors = (await response.json())["errors"]
        assert {tuple(e["loc"]) for e in errors} == {("url",), ("sizes", 0)}

        for bad in (b"{not json", b'{"url": "https://images.example/a.jpg", "owner": "x"}'):
            response = await client.post("/images", data=bad)
            assert response.status == 422, bad
            assert (await response.json())["errors"]
        assert await broker.depth(queue) == 0

        # The API declared the worker's queues, so a job accepted now waits for a worker.
        _, status_url = await submit(client, {"url": "https://images.example/b.png"})
        assert await broker.depth(queue) == 1
        waiting = await (await client.get(status_url)).json()
        assert (waiting["state"], waiting["progress"]) == ("waiting", None)


async def test_an_image_failing_every_attempt_is_parked_then_fixed_and_replayed(
    broker: Broker,
) -> None:
    simulation = Simulation(step_seconds=0.01)
    app = thumbnails_app(broker, simulation)
    url = "https://images.example/uploads/corrupt-scan.jpg"
    async with running_worker(app), api_client(broker, app) as client:
        job_id, status_url = await submit(client, {"url": url, "sizes": [128]})
        seen: list[Status] = []
        parked = await poll_until(client, status_url, lambda s: s["state"] == "parked", seen)
        assert parked["attempt"] == FAST_RETRY.max_attempts
        assert parked["error"].startswith("DecoderError: cannot decode")
        assert parked["result"] is None

        simulation.decoder_fixed = True  # "deploy the fix", then replay what was parked
        async with ParkingLot(make_settings(), images_queue(app)) as lot:
            listed = await lot.list()
            assert [(j.job_id, j.attempts) for j in listed.jobs] == [(job_id, 3)]
            # A quorum queue takes back the jobs a scan held a moment after the scan closed.
            await wait_for(lambda: broker.depth_is(f"{images_queue(app)}.parked", 1), timeout=5)
            report = await lot.replay(Selection(ids=frozenset({job_id})))
            assert report.replayed == 1
            final = await poll_until(client, status_url, lambda s: s["state"] == "completed", seen)
            assert await lot.depth() == 0

    assert (final["attempt"], final["replays"], final["error"]) == (1, 1, None)
    assert final["result"]["metadata"]["source"] == url
    assert set(final["result"]["thumbnails"]) == {"128"}
