"""Faults against the real broker, around publisher confirms: a confirm that never comes (for
a publisher and for a worker's retry copy), a blocked connection, a dead writer task, a stalled
event loop. No confirmed job may be lost, and duplicates stay bounded.

A ``tests.support.proxy.TcpProxy`` sits between the client and the broker.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from brokerjobs import App, Publisher, RetryPolicy, current_job
from brokerjobs.broker.amqp import connect
from brokerjobs.envelope import encode
from tests.support.broker import Broker, make_settings, unique, wait_for
from tests.support.fault_app import FaultJob, queue_name
from tests.support.faults import (
    fault_topology,
    proxied_settings,
    proxy_to_broker,
    publish_jobs,
    report,
    worker_task,
)
from tests.support.proxy import BASIC_ACK

pytestmark = pytest.mark.slow


async def test_publish_whose_confirm_never_comes_is_republished_on_a_new_connection(
    broker: Broker, tmp_path: Path
) -> None:
    """The broker stores a job but its confirm is lost while the connection stays up (seen on a
    3-node cluster after a node kill): the publish must not hang. After confirm_timeout the
    publisher drops the channel and publishes again, with the same id, on a new connection."""
    app = await fault_topology(broker, unique("noconfirm"), tmp_path / "records")
    queue = queue_name(app.name)

    async with proxy_to_broker() as proxy:
        settings = proxied_settings(proxy, confirm_timeout=1.0)
        async with Publisher(settings, exchange=app.exchange) as publisher:
            proxy.swallow(BASIC_ACK, sender="server")
            job_id = await asyncio.wait_for(publisher.publish(FaultJob(n=1)), 20)
            second_id = await publisher.publish(FaultJob(n=2))
        connections = proxy.accepted

    stored = await broker.drain(queue)
    report("no-confirm", connections=connections, stored=len(stored))
    assert proxy.triggered == [("server", BASIC_ACK)]
    assert connections == 2, "the channel with the missing confirm must be replaced"
    # Stored twice (the unconfirmed copy and the republished one), same id: a bounded duplicate.
    assert [d.message_id for d in stored] == [job_id, job_id, second_id]


async def test_a_blocked_connection_waits_for_the_broker_instead_of_dropping_the_channel(
    broker: Broker, tmp_path: Path
) -> None:
    """Under a resource alarm the broker blocks publishers (connection.blocked) and confirms
    stop: that is backpressure, not a wedged channel. The publish waits past confirm_timeout,
    on the same connection, and completes once the broker unblocks, stored once."""
    app = await fault_topology(broker, unique("blocked"), tmp_path / "records")
    queue = queue_name(app.name)

    async with proxy_to_broker() as proxy:
        settings = proxied_settings(proxy, confirm_timeout=0.5)
        async with Publisher(settings, exchange=app.exchange) as publisher:
            proxy.block()
            publishing = asyncio.ensure_future(publisher.publish(FaultJob(n=1)))
            with pytest.raises(TimeoutError):  # still waiting after 4 confirm timeouts
                await asyncio.wait_for(asyncio.shield(publishing), 2.0)
            proxy.unblock()
            job_id = await asyncio.wait_for(publishing, 10)
        connections = proxy.accepted

    stored = await broker.drain(queue)
    report("blocked", connections=connections, stored=len(stored))
    assert connections == 1, "a blocked connection must not be replaced"
    assert [d.message_id for d in stored] == [job_id]


async def test_publishes_stuck_behind_a_dead_writer_are_sent_again(
    broker: Broker, tmp_path: Path
) -> None:
    """aiormq's writer task dies under a publisher (fault injection): aiormq closes the
    connection and fails the waiting publishes with its close reason, a bare Exception(). They
    must come out as PublishInterrupted and be published again, with the same ids, on a new
    connection, not escape as an unexpected error."""
    app = await fault_topology(broker, unique("deadwriter"), tmp_path / "records")
    queue = queue_name(app.name)

    async with proxy_to_broker() as proxy:
        settings = proxied_settings(proxy, confirm_timeout=1.0)
        async with Publisher(settings, exchange=app.exchange) as publisher:
            connection = publisher._connection
            assert connection is not None
            writer = connection._raw.transport.connection._writer_task  # type: ignore[attr-defined]
            writer.cancel()  # fault injection: aiormq's writer dies, the connection stays
            ids = await asyncio.wait_for(
                publisher.publish_many(FaultJob(n=n) for n in range(100)), 30
            )
        connections = proxy.accepted

    stored = [d.message_id or "" for d in await broker.drain(queue)]
    report("dead-writer", connections=connections, stored=len(stored))
    assert connections == 2, "the connection with the dead writer must be replaced"
    assert sorted(stored) == sorted(ids)  # nothing reached the broker before: no duplicate


async def test_a_stalled_event_loop_is_not_mistaken_for_missing_confirms() -> None:
    """Blocking code stalls the loop longer than confirm_timeout while confirms are pending;
    the broker confirms meanwhile, unread. The watchdog must let the reader run before judging,
    not drop a healthy channel (found in review: all 50 publishes failed, 35 never sent)."""
    connection = await connect(make_settings(confirm_timeout=1.0), "test-loop-stall")
    try:
        channel = await connection.channel(confirms=True)
        queue = await channel.declare_private_queue()
        messages = [(encode(FaultJob(n=n)), "", queue) for n in range(50)]
        publishing = asyncio.ensure_future(channel.publish_many(messages, 1000))
        for _ in range(5):  # the publishes go out; their confirms are pending
            await asyncio.sleep(0)
        assert channel.unconfirmed > 0
        time.sleep(1.3)  # noqa: ASYNC251 - fault injection: blocking code stalls the loop
        failed = await asyncio.wait_for(publishing, 10)
        stored = (await channel.inspect_queue(queue)).messages
        broken = channel.broken
    finally:
        await connection.close()

    report("loop-stall", failed=len(failed), stored=stored)
    assert failed == []
    assert not broken
    assert stored == 50


async def test_worker_whose_retry_confirm_never_comes_opens_a_new_session(
    broker: Broker,
) -> None:
    """A failing job's copy to the retry tier is stored but never confirmed: the original stays
    unacked, the worker drops the session after confirm_timeout, and the job is retried and
    completed, without hanging a prefetch slot forever. At least once, exactly bounded: the
    unconfirmed copy was stored, and the redelivered original fails again and sends a second
    copy, so the job completes twice, and then nothing is left anywhere."""
    app = App(unique("noconfirmw"))
    completed: list[int] = []

    @app.handler(FaultJob, retry=RetryPolicy(delays=(0.2,), max_attempts=5))
    async def handle(task: FaultJob) -> None:
        if current_job().attempt == 1:
            raise RuntimeError("first attempt fails")
        completed.append(task.n)

    broker.track(app)  # after the handler: its queue is part of the topology only now
    main = app.topology().main_queues[0].name
    tier = app.topology().retry_tiers(main)[0].name
    async with proxy_to_broker() as proxy:
        settings = proxied_settings(proxy, confirm_timeout=1.0, prefetch=5)
        async with worker_task(app, settings) as (worker, task):
            proxy.swallow(BASIC_ACK, sender="server")  # the retry copy's confirm
            await publish_jobs(app.exchange, 1)
            await wait_for(lambda: len(completed) == 2 or task.done(), 30)
            assert not task.done()
            await wait_for(lambda: worker.ready, 15)
            reconnects = worker.reconnects
            for queue in (main, tier, f"{main}.parked"):
                assert await broker.depth(queue) == 0, queue

    report("no-confirm-worker", reconnects=reconnects, completions=len(completed))
    assert proxy.triggered == [("server", BASIC_ACK)]
    assert reconnects >= 1
    assert completed == [0, 0]
