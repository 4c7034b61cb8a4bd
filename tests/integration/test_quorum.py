"""The same retry -> park -> replay path on quorum queues."""

from __future__ import annotations

from pydantic import BaseModel

from brokerjobs import App, Publisher, RetryPolicy, current_job, job
from brokerjobs.parking import ParkingLot
from tests.support.broker import Broker, make_settings, running_worker, unique, wait_for


@job("ledger.post")
class PostLedger(BaseModel):
    entry: int


async def test_retry_park_and_replay_work_on_quorum_queues(broker: Broker) -> None:
    app = App(unique("quorum"), queue_kind="quorum")
    fixed = False
    attempts: list[int] = []
    done: list[int] = []

    @app.handler(PostLedger, retry=RetryPolicy(delays=(0.2, 0.4), max_attempts=3))
    async def post(task: PostLedger) -> None:
        attempts.append(current_job().attempt)
        if not fixed:
            raise RuntimeError("ledger locked")
        done.append(task.entry)

    broker.track(app)
    queue = f"{app.name}.ledger.post"
    async with running_worker(app):
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            await publisher.publish(PostLedger(entry=1))
        await wait_for(lambda: broker.depth_is(f"{queue}.parked", 1), timeout=10)
        assert attempts == [1, 2, 3]

        fixed = True
        async with ParkingLot(make_settings(), queue) as lot:
            assert (await lot.replay()).replayed == 1
        await wait_for(lambda: done == [1])
    assert attempts == [1, 2, 3, 1]
    state = await broker.state(queue)
    assert state.messages == 0
