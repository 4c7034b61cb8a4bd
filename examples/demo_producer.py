"""Demo producer: publishes thumbnail and email jobs, then waits until the queues are empty."""

from __future__ import annotations

import argparse
import asyncio
import logging

from brokerjobs import Publisher, Settings
from brokerjobs.transport import connect
from examples.demo import MakeThumbnail, SendEmail, app

log = logging.getLogger("demo.producer")


async def wait_until_drained(settings: Settings, limit_s: float) -> None:
    topology = app.topology()
    watched = [q.name for q in topology.queues if q.role in ("main", "retry")]
    connection = await connect(settings, "demo-monitor")
    try:
        channel = await connection.channel(confirms=False)
        async with asyncio.timeout(limit_s):
            while True:
                depths = [(await channel.inspect_queue(name)).messages for name in watched]
                log.info("waiting: %d job(s) queued or waiting for a retry", sum(depths))
                if sum(depths) == 0:
                    return
                await asyncio.sleep(1)
    finally:
        await connection.close()


async def main(count: int) -> None:
    settings = Settings()
    jobs = [
        MakeThumbnail(image_id=i) if i % 2 else SendEmail(to=f"user{i}@example.com", subject="hi")
        for i in range(count)
    ]
    async with Publisher(settings, exchange=app.exchange) as publisher:
        ids = await publisher.publish_many(jobs)
    log.info("published %d jobs, all confirmed by the broker", len(ids))
    await wait_until_drained(settings, limit_s=120)
    log.info("all jobs processed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=30)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(parser.parse_args().count))
