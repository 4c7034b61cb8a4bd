"""Job status and progress, seen through a StatusTracker as an API would see them."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from brokerjobs import App, Publisher, RetryPolicy, current_job, job
from brokerjobs.envelope import new_job_id
from brokerjobs.status import JobStatus, MemoryStatusStore, StatusTracker, report_progress
from tests.support.broker import Broker, make_settings, running_worker, unique, wait_for


@job("video.encode")
class EncodeVideo(BaseModel):
    name: str
    fail_first: bool = False


class Recording:
    """A store that keeps every accepted status, to check the order the API saw."""

    def __init__(self) -> None:
        self.inner = MemoryStatusStore()
        self.history: list[JobStatus] = []

    async def put(self, status: JobStatus) -> None:
        await self.inner.put(status)
        if await self.inner.get(status.job_id) is status:
            self.history.append(status)

    async def get(self, job_id: str) -> JobStatus | None:
        return await self.inner.get(job_id)


async def test_progress_and_the_final_result_are_visible_through_the_tracker(
    broker: Broker,
) -> None:
    step = asyncio.Event()
    app = encoding_app(step)

    def sync_progress_is_harmless_without_tracking() -> None:
        report_progress(10)  # outside a job: a no-op, no error

    sync_progress_is_harmless_without_tracking()
    broker.track(app)
    store = Recording()
    tracking = StatusTracker(make_settings(), exchange=app.exchange, store=store)
    async with tracking as tracker, running_worker(app):
        job_id = new_job_id()
        await tracker.mark_waiting(job_id, "video.encode")  # before publishing: no race
        async with Publisher.for_app(app, make_settings()) as publisher:
            await publisher.publish(EncodeVideo(name="cat", fail_first=True), job_id=job_id)

        async def at_75() -> bool:
            status = await tracker.get(job_id)
            return status is not None and status.progress == 75

        await wait_for(at_75, timeout=10)
        running = await tracker.get(job_id)
        assert running is not None
        assert (running.state, running.attempt, running.message) == (
            "active",
            2,
            "encoding 75%",
        )
        step.set()
        final = await tracker.wait(job_id, timeout=10)

    assert final.state == "completed"
    assert final.result == {"url": "https://cdn.example/cat.mp4"}
    check_history(store.history)


def encoding_app(step: asyncio.Event) -> App:
    """Its handler fails a first attempt if asked to, reports 25, 50 and 75 % progress, then
    waits for ``step`` before returning the video's URL."""
    app = App(unique("status"), track_status=True)

    @app.handler(EncodeVideo, retry=RetryPolicy(delays=(0.1,), max_attempts=3))
    async def encode(task: EncodeVideo) -> dict[str, str]:
        if task.fail_first and current_job().attempt == 1:
            raise OSError("disk full")
        for percent in (25, 50, 75):
            report_progress(percent, f"encoding {percent}%")
            await asyncio.sleep(0.05)
        await step.wait()
        return {"url": f"https://cdn.example/{task.name}.mp4"}

    return app


def check_history(history: list[JobStatus]) -> None:
    """The statuses the API saw, in order: waiting, a retry, then attempt 2's progress."""
    states = [(s.state, s.attempt, s.progress) for s in history]
    assert states[0] == ("waiting", 1, None)
    assert ("retried", 1, None) in states
    assert states[-4:] == [
        ("active", 2, 25.0),
        ("active", 2, 50.0),
        ("active", 2, 75.0),
        ("completed", 2, 100.0),
    ]
    retrying = next(s for s in history if s.state == "retried")
    assert retrying.error == "OSError: disk full"
