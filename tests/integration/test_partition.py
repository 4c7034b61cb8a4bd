"""A silent partition (packets dropped, no RST, no FIN) between a worker and its first node.

The worker's URL lists the node behind a proxy first and the same broker directly second: the
proxy's blackhole plays a partition of the first node only. The 3-node version, with a second
worker taking over the prefetched jobs, is in tests/cluster.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from brokerjobs import App, Publisher, job
from tests.support.broker import (
    TEST_HOST,
    TEST_PORT,
    TEST_URL,
    Broker,
    make_settings,
    running_worker,
    unique,
    wait_for,
)
from tests.support.proxy import TcpProxy

HEARTBEAT = 2
ATTEMPT_S = 1.0


@job("partition.note")
class Note(BaseModel):
    n: int


async def test_a_silent_first_node_makes_the_worker_unready_then_fail_over_to_the_next(
    broker: Broker,
) -> None:
    app = App(unique("partition"))
    done: list[int] = []

    @app.handler(Note)
    async def note(task: Note) -> None:
        done.append(task.n)

    broker.track(app)

    async with TcpProxy(TEST_HOST, TEST_PORT) as proxy:  # the broker under test, not 5672's
        settings = make_settings(
            url=f"{proxy.url()},{TEST_URL}",
            heartbeat=HEARTBEAT,
            connect_attempt_timeout=ATTEMPT_S,
        )
        async with running_worker(app, settings) as worker:
            assert proxy.open_connections == 1  # the first node of the list won
            assert worker.ready
            proxy.blackhole()
            cut = time.monotonic()
            await wait_for(lambda: not worker.ready, timeout=2 * HEARTBEAT + 3)
            unready_after = time.monotonic() - cut
            assert worker.reconnects == 0  # unready before aiormq gives the connection up

            # aiormq gives up after (heartbeat + 1) * 3 s; then one attempt on the silent node.
            limit = (HEARTBEAT + 1) * 3 + HEARTBEAT + ATTEMPT_S + 5
            await wait_for(lambda: worker.ready, timeout=limit)
            failover = time.monotonic() - cut
            assert proxy.blackholed and worker.reconnects == 1  # ready on the second node

            async with Publisher(make_settings(), exchange=app.exchange) as publisher:
                await publisher.publish_many(Note(n=i) for i in range(20))
            await wait_for(lambda: len(done) == 20, timeout=10)
            proxy.heal()
    print(f"\npartition: unready after {unready_after:.1f}s, ready again after {failover:.1f}s")
    assert sorted(done) == list(range(20))
