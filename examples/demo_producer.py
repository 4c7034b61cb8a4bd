"""Demo producer: publishes thumbnail and email jobs, then waits until each one has finished."""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging

from brokerjobs import Publisher, Settings, StatusTracker
from examples.demo import MakeThumbnail, SendEmail, app

log = logging.getLogger("demo.producer")


async def main(count: int, limit_s: float = 120) -> None:
    settings = Settings()
    jobs = [
        MakeThumbnail(image_id=i) if i % 2 else SendEmail(to=f"user{i}@example.com", subject="hi")
        for i in range(count)
    ]
    # Subscribed to the app's status events before publishing, so no final state is missed.
    async with StatusTracker(settings, exchange=app.exchange) as tracker:
        async with Publisher(settings, exchange=app.exchange) as publisher:
            ids = await publisher.publish_many(jobs)
        log.info("published %d jobs, all confirmed by the broker", len(ids))
        finished = await asyncio.gather(*(tracker.wait(job_id, limit_s) for job_id in ids))
    states = collections.Counter(status.state for status in finished)
    retried = sum(1 for status in finished if status.attempt > 1)
    log.info(
        "all %d jobs finished: %s (%d after a retry)",
        len(ids),
        ", ".join(f"{n} {state}" for state, n in sorted(states.items())),
        retried,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=30)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(parser.parse_args().count))
