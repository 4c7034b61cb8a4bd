"""The demo app run by `scripts/demo`: thumbnails and emails, one job in ten failing once."""

from __future__ import annotations

import asyncio
import logging

from pydantic import BaseModel, Field

from brokerjobs import App, RetryPolicy, current_job, job

log = logging.getLogger("demo")


@job("image.thumbnail", priority=2, retry=RetryPolicy(delays=(1.0, 5.0), max_attempts=3))
class MakeThumbnail(BaseModel):
    image_id: int
    width: int = Field(default=256, gt=0, le=4096)


@job("email.send", priority=5)
class SendEmail(BaseModel):
    to: str
    subject: str


app = App("demo", track_status=True)  # the producer awaits each job's final state
app.queue("demo.images", "image.*")
app.queue("demo.emails", "email.#")


@app.handler(MakeThumbnail, queue="demo.images")
async def make_thumbnail(task: MakeThumbnail) -> None:
    context = current_job()
    if task.image_id % 10 == 3 and context.attempt == 1:
        raise ConnectionError("image store timed out (demo: fails once, then retries)")
    await asyncio.sleep(0.05)
    log.info("thumbnail %dpx for image %d (attempt %d)", task.width, task.image_id, context.attempt)


@app.handler(SendEmail, queue="demo.emails")
def send_email(task: SendEmail) -> None:
    log.info("email to %s: %s", task.to, task.subject)
