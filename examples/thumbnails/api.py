"""The HTTP side: ``python -m examples.thumbnails.api [--host H] [--port P]``.

``POST /images`` validates the request, records the job as waiting, publishes it and answers
``202 Accepted`` with the job id and its status URL; ``GET /jobs/{job_id}`` answers with the
job's status (state, attempt, progress, message, result, error) as the workers report it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from pydantic import ValidationError

from brokerjobs import (
    App,
    Publisher,
    PublishError,
    Settings,
    StatusStore,
    StatusTracker,
    declare_topology,
    job_spec,
    load_settings,
    new_job_id,
)
from examples.thumbnails.jobs import ImageRequest, ProcessImage

log = logging.getLogger("thumbnails.api")

TRACKER = web.AppKey("tracker", StatusTracker)
PUBLISHER = web.AppKey("publisher", Publisher)
JOB_NAME = job_spec(ProcessImage).name


def create_api(
    worker_app: App,
    settings: Settings | None = None,
    *,
    store: StatusStore | None = None,
    declare_first: bool = True,
) -> web.Application:
    """The API for ``worker_app``'s jobs; it connects to the broker on start-up.

    ``declare_first`` declares the worker app's queues first, so jobs accepted while no
    worker runs wait in their queue instead of being refused as unroutable.
    """
    api = web.Application()
    api.cleanup_ctx.append(_broker(worker_app, settings or load_settings(), store, declare_first))
    api.router.add_post("/images", submit_image, name="submit_image")
    api.router.add_get("/jobs/{job_id}", job_status, name="job_status")
    return api


def _broker(
    worker_app: App, settings: Settings, store: StatusStore | None, declare_first: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def connected(api: web.Application) -> AsyncIterator[None]:
        if declare_first:
            await declare_topology(worker_app, settings)
        # The tracker subscribes before the first publish, so no status event is missed.
        tracker = StatusTracker(settings, exchange=worker_app.exchange, store=store)
        async with tracker, Publisher.for_app(worker_app, settings) as publisher:
            api[TRACKER] = tracker
            api[PUBLISHER] = publisher
            yield

    return connected


async def submit_image(request: web.Request) -> web.Response:
    try:
        body = ImageRequest.model_validate_json(await request.read())
    except ValidationError as exc:
        errors = json.loads(exc.json(include_url=False))
        return web.json_response({"errors": errors}, status=422)
    job_id = new_job_id()
    # Waiting before publishing: a fast worker's events can never be overtaken by this one.
    await request.app[TRACKER].mark_waiting(job_id, JOB_NAME)
    try:
        await request.app[PUBLISHER].publish(body.to_job(), job_id=job_id)
    except PublishError as exc:
        log.warning("could not enqueue %s: %s", job_id, exc)
        return web.json_response({"error": f"could not enqueue the job: {exc}"}, status=503)
    status_url = str(request.app.router["job_status"].url_for(job_id=job_id))
    return web.json_response(
        {"job_id": job_id, "status_url": status_url},
        status=202,
        headers={"Location": status_url},
    )


async def job_status(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    status = await request.app[TRACKER].get(job_id)
    if status is None:
        return web.json_response({"error": f"no job {job_id!r}"}, status=404)
    return web.json_response(status.model_dump(mode="json"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the thumbnails example's HTTP API")
    parser.add_argument("--host", default=os.environ.get("THUMBNAILS_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("THUMBNAILS_PORT", "8080")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from examples.thumbnails.worker import app  # the same App (name, queues) as the workers

    web.run_app(create_api(app), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
