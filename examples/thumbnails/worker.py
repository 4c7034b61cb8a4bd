"""The worker side: ``brokerjobs worker examples.thumbnails.worker:app``.

The slow work of an image upload (download, thumbnails, preview, metadata) is simulated with
short sleeps and reported as progress 25/50/75 %; the result dict becomes the job's final status.

Environment (read at import, so the worker and the API agree):

- ``THUMBNAILS_APP``: the app name = exchange and queue prefix (default ``thumbnails``)
- ``THUMBNAILS_STEP_SECONDS``: how long each simulated step takes (default 0.5)
- ``THUMBNAILS_DECODER_FIXED``: ``1`` once "the decoder fix is deployed"; until then every image
  whose URL contains ``corrupt`` fails each attempt, is retried, and ends up parked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from brokerjobs import App, RetryPolicy, current_job, report_progress
from examples.thumbnails.jobs import ProcessImage

CDN = "https://cdn.example/images"


class DecoderError(Exception):
    """The (simulated) image decoder cannot read the file: it fails on every attempt."""


@dataclass
class Simulation:
    """Knobs of the simulated work; mutable, so a running worker can be "fixed"."""

    step_seconds: float = 0.5
    decoder_fixed: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Simulation:
        return cls(
            step_seconds=float(env.get("THUMBNAILS_STEP_SECONDS", "0.5")),
            decoder_fixed=env.get("THUMBNAILS_DECODER_FIXED", "") in ("1", "true", "yes"),
        )


def images_queue(app: App) -> str:
    """The app's one main queue (its parking queue is ``<queue>.parked``)."""
    return f"{app.name}.images"


def create_app(
    name: str, simulation: Simulation | None = None, *, retry: RetryPolicy | None = None
) -> App:
    """The worker app ``name``; ``retry`` overrides the job's policy (tests use short ones)."""
    sim = simulation or Simulation()
    app = App(name, track_status=True)
    queue = app.queue(images_queue(app), "image.#")

    @app.handler(ProcessImage, queue=queue, retry=retry)
    async def process_image(task: ProcessImage) -> dict[str, Any]:
        key = hashlib.sha256(task.url.encode()).hexdigest()[:16]
        await asyncio.sleep(sim.step_seconds)  # download and decode
        if "corrupt" in task.url and not sim.decoder_fixed:
            raise DecoderError(f"cannot decode {task.url}: truncated JPEG data")
        report_progress(25, "thumbnail")
        await asyncio.sleep(sim.step_seconds)
        thumbnails = {str(size): f"{CDN}/{key}/thumb-{size}.jpg" for size in task.sizes}
        report_progress(50, "preview")
        await asyncio.sleep(sim.step_seconds)
        report_progress(75, "metadata")
        await asyncio.sleep(sim.step_seconds)
        return {
            "thumbnails": thumbnails,
            "preview": f"{CDN}/{key}/preview.jpg",
            "metadata": _metadata(task.url, key, current_job().attempt),
        }

    return app


def _metadata(url: str, key: str, attempt: int) -> dict[str, Any]:
    seed = int(key, 16)
    return {
        "source": url,
        "format": "jpeg",
        "width": 640 + seed % 3200,
        "height": 480 + seed % 2400,
        "sha256_prefix": key,
        "attempt": attempt,
    }


simulation = Simulation.from_env()
app = create_app(os.environ.get("THUMBNAILS_APP", "thumbnails"), simulation)
