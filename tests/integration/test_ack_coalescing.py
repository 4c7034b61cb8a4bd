"""Coalesced acks on a real broker: the replay tool acks thousands of held deliveries from many
tasks, in confirm order, while it publishes on the same connection. No tag may be acked twice
(RabbitMQ would close the channel: "unknown delivery tag") and none may be left out.

Without ordering the ack frames of overlapping flushes this failed every run (a few thousand
"kept" with "channel 1 is closed").
"""

from __future__ import annotations

from brokerjobs.envelope import OutgoingMessage, new_job_id
from brokerjobs.parking import ParkingLot
from tests.support.broker import Broker, make_settings, unique, wait_for

COUNT = 10000
TRACEBACK = "t" * 4000  # as big as a parked traceback


async def test_replaying_thousands_acks_each_parked_copy_exactly_once(broker: Broker) -> None:
    queue = unique("acks")
    for name in (queue, f"{queue}.parked"):
        broker.track_queue(name)
        await (await broker.fresh_channel()).declare_queue(name, {})
    headers = {"bj-attempt": 3, "bj-error-traceback": TRACEBACK}
    parked = [
        (OutgoingMessage(b'{"n": 1}', new_job_id(), "x", 0, dict(headers)), "", f"{queue}.parked")
        for _ in range(COUNT)
    ]
    assert await (await broker.fresh_channel()).publish_many(parked, 500) == []

    async with ParkingLot(make_settings(), queue) as lot:
        report = await lot.replay()
    assert report.failed == [] and report.replayed == COUNT, report.failed[:3]
    await wait_for(lambda: broker.depth_is(f"{queue}.parked", 0), timeout=10)
    assert await broker.depth(queue) == COUNT
