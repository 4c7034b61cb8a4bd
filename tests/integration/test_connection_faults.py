"""Faults against the real broker, on the connection: cut mid-stream (also in the middle of a
reconnect), the worker's queue deleted, a stop during an outage. Every job is counted: each
confirmed job must be processed at least once, and duplicates stay within what at-least-once
delivery allows (the unacked window, i.e. prefetch).

A ``tests.support.proxy.TcpProxy`` sits between an in-process Worker and the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from brokerjobs import Worker
from tests.support.broker import Broker, make_settings, running_worker, unique, wait_for
from tests.support.fault_app import Records, build_app, queue_name, read_records
from tests.support.faults import (
    all_processed,
    depth_is,
    duplicates,
    proxied_settings,
    proxy_to_broker,
    publish_jobs,
    report,
    until_ready,
    worker_task,
)
from tests.support.proxy import (
    BASIC_CONSUME,
    CHANNEL_CLOSE,
    CHANNEL_OPEN,
    CONNECTION_OPEN_OK,
    QUEUE_DECLARE,
    Method,
    Sender,
    TcpProxy,
)

pytestmark = pytest.mark.slow


# -- cut connection ------------------------------------------------------------------------------


async def test_cut_connection_reconnects_and_resumes_without_loss(
    broker: Broker, tmp_path: Path
) -> None:
    """The TCP connection dies mid-stream (aborted, no AMQP close): the worker notices, is not ready
    while the broker is unreachable, reconnects when it is back, and finishes every job."""
    prefetch, records = 10, tmp_path / "records"
    app = broker.track(build_app(unique("cut"), records, 0.05, spread=1.0))
    queue = queue_name(app.name)

    async with proxy_to_broker() as proxy:
        settings = proxied_settings(proxy, prefetch=prefetch)
        async with running_worker(app, settings) as worker:
            assert proxy.open_connections == 1
            confirmed = await publish_jobs(app.exchange, 100)
            cut, at_cut = await cut_mid_stream(proxy, worker, records)
            assert (await broker.state(queue)).consumers == 1
            confirmed += await publish_jobs(app.exchange, 50, start=100)
            await all_processed(records, confirmed, 20)
            await wait_for(lambda: depth_is(broker, queue, 0), 5)
            reconnects = worker.reconnects
        accepted = proxy.accepted

    final = read_records(records)
    processed = final.done_ids()
    report(
        "cut",
        confirmed=len(confirmed),
        processed_at_cut=len(at_cut.done),
        in_flight_at_cut=len(at_cut.started) - len(at_cut.done),
        connections_cut=cut,
        refused_while_paused=proxy.refused,
        connections=accepted,
        reconnects=reconnects,
        processed_total=len(processed),
        duplicates=duplicates(processed),
        started_not_done=len(final.started) - len(processed),
    )
    assert cut >= 1
    assert set(processed) == set(confirmed)
    assert duplicates(processed) <= prefetch


async def cut_mid_stream(proxy: TcpProxy, worker: Worker, records: Path) -> tuple[int, Records]:
    """Cut the worker's connection with 30 jobs done and some in flight, keep the broker
    unreachable for a while, then let it reconnect; the connections cut and the records at
    the cut."""

    def mid_stream() -> bool:  # 30 done, some in flight
        r = read_records(records)
        return len(r.done) >= 30 and len(r.started) > len(r.done)

    await wait_for(mid_stream, 15, interval=0.005)

    proxy.pause()
    cut = proxy.cut()
    at_cut = read_records(records)
    await wait_for(lambda: not worker.ready, 10, interval=0.005)
    # While the broker is unreachable the worker keeps trying, and stays not ready.
    await wait_for(lambda: proxy.refused >= 1, 10)
    assert not worker.ready
    proxy.resume()
    await wait_for(lambda: worker.ready, 20, interval=0.005)
    assert worker.reconnects >= 1
    return cut, at_cut


# -- queue deleted ----------------------------------------------------------------------------


async def test_worker_recovers_when_its_queue_is_deleted(broker: Broker, tmp_path: Path) -> None:
    """Deleting the main queue cancels the consumer: the worker goes not ready, re-declares the
    topology on reconnect, consumes again, and processes new jobs."""
    records = tmp_path / "records"
    app = broker.track(build_app(unique("qdel"), records, 0.0))
    queue = queue_name(app.name)

    async with running_worker(app, make_settings(prefetch=10)) as worker:
        before = await publish_jobs(app.exchange, 10)
        await all_processed(records, before, 10)
        assert worker.reconnects == 0

        await (await broker.fresh_channel()).delete_queue(queue)
        await wait_for(lambda: not worker.ready, 10, interval=0.005)
        await wait_for(lambda: worker.ready, 15, interval=0.005)
        assert worker.reconnects >= 1
        state = await broker.state(queue)  # re-declared by the worker
        assert state.consumers == 1

        after = await publish_jobs(app.exchange, 20, start=10)
        await all_processed(records, after, 10)
        reconnects = worker.reconnects

    processed = read_records(records).done_ids()
    report(
        "queue-deleted",
        confirmed=len(before) + len(after),
        processed_total=len(processed),
        duplicates=duplicates(processed),
        reconnects=reconnects,
    )
    assert sorted(processed) == sorted(before + after)


SETUP_CUTS = [
    pytest.param(CHANNEL_OPEN, "client", False, id="channel.open-lost"),
    pytest.param(QUEUE_DECLARE, "client", False, id="queue.declare-lost"),
    pytest.param(BASIC_CONSUME, "client", False, id="basic.consume-lost"),
    # The topology channel's close is lost: the next channel.open meets a closed connection.
    pytest.param(CHANNEL_CLOSE, "client", False, id="channel.close-lost"),
    # Connected, then the connection drops before the first channel is open.
    pytest.param(CONNECTION_OPEN_OK, "server", True, id="dropped-after-connection.open-ok"),
]


@pytest.mark.parametrize(("method", "sender", "forward"), SETUP_CUTS)
async def test_connection_lost_during_session_setup_is_retried(
    broker: Broker, tmp_path: Path, method: Method, sender: Sender, forward: bool
) -> None:
    """A connection that dies while the worker reconnects (declaring, opening channels,
    consuming) is one more failed attempt: the worker retries, it must not die."""
    records = tmp_path / "records"
    app = broker.track(build_app(unique("setup"), records, 0.0))

    async with proxy_to_broker() as proxy:
        settings = proxied_settings(proxy, prefetch=10)
        async with worker_task(app, settings) as (worker, task):
            confirmed = await publish_jobs(app.exchange, 5)
            await all_processed(records, confirmed, 10)

            proxy.cut_on(method, sender=sender, forward=forward)
            proxy.cut()  # the reconnect runs into the armed cut
            await wait_for(lambda: bool(proxy.triggered) or task.done(), 15)
            await until_ready(worker, task)
            assert proxy.triggered == [(sender, method)]
            assert worker.reconnects >= 1

            confirmed += await publish_jobs(app.exchange, 10, start=5)
            await all_processed(records, confirmed, 10)
            reconnects, connections = worker.reconnects, proxy.accepted

    report(
        f"setup-cut {sender} {method}",
        confirmed=len(confirmed),
        processed=len(read_records(records).done),
        reconnects=reconnects,
        connections=connections,
    )
    assert set(read_records(records).done_ids()) == set(confirmed)


# -- stop during an outage ----------------------------------------------------------------------


async def test_stop_during_a_broker_outage_returns_promptly(broker: Broker, tmp_path: Path) -> None:
    """SIGTERM (stop()) while the broker is unreachable: nothing is in flight, so the worker
    must exit at once, not after the connection attempt's timeout (a supervisor such as
    Kubernetes would SIGKILL it first)."""
    app = broker.track(build_app(unique("outage"), tmp_path / "records", 0.0))

    async with proxy_to_broker() as proxy:
        settings = proxied_settings(proxy, connect_timeout=6)
        worker = Worker(app, settings)
        task = asyncio.create_task(worker.run())
        try:
            await until_ready(worker, task)
            proxy.pause()
            proxy.cut()
            await wait_for(lambda: not worker.ready, 10, interval=0.005)
            await wait_for(lambda: proxy.refused >= 2, 10)  # inside a reconnect attempt

            stopped_at = time.monotonic()
            worker.stop()
            await asyncio.wait_for(asyncio.shield(task), 30)
            took = time.monotonic() - stopped_at
        finally:
            worker.stop()
            if not task.done():
                task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task

    report("stop-during-outage", seconds=f"{took:.2f}", refused=proxy.refused)
    assert took < 2.0, f"stop() took {took:.1f}s during the outage (connect_timeout=6s)"
