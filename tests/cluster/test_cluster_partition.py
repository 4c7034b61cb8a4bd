"""A silent partition between one worker and its node, on a real 3-node cluster.

Two workers consume one quorum queue. Worker 1 lists its node ``a`` behind a TcpProxy first,
then ``b`` and ``c``; worker 2 lists ``b, c, a`` directly. With worker 1 holding a full
prefetch, the proxy blackholes (packets dropped both ways: no RST, no FIN, new connections
accepted and never answered). With the *default* heartbeat and connect settings, worker 1 must:
turn unready (no frame for 2 heartbeats), give the connection up, spend one bounded attempt on
the silent node and connect to another one within heartbeat detection + attempt timeout; the
broker must redeliver the jobs whose acks were lost in the cut; and nothing confirmed is lost.

Why the cut lasts until worker 1 is back (at most 60 s) and not a fixed 60 s: everything the
test proves happens in the first ~30 s; a longer cut only keeps a dead TCP connection waiting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from pydantic import BaseModel

from brokerjobs import App, Publisher, Settings, Worker, current_job, job
from tests.support.cluster import RabbitCluster
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.slow

PREFETCH = 20
BACKLOG = 400
TRICKLE_PER_S = 20
HANDLER_S = 0.2
CUT_MAX_S = 60.0
SLACK_S = 6.0  # loop scheduling, the reconnect supervisor's first pause, declaring the topology


@job("partition.work")
class Work(BaseModel):
    n: int


@dataclass
class Tally:
    confirmed: set[str] = field(default_factory=set)
    done: dict[str, collections.Counter[str]] = field(default_factory=dict)  # worker -> ids
    redelivered: collections.Counter[str] = field(default_factory=collections.Counter)
    after_cut: set[str] = field(default_factory=set)  # worker 1, completed on the cut connection
    cut_at: float | None = None

    def completions(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for counts in self.done.values():
            total.update(counts)
        return total


def build_app(tally: Tally, label: str) -> App:
    app = App("bjpartition", queue_kind="quorum")
    tally.done[label] = collections.Counter()

    @app.handler(Work)
    async def work(task: Work) -> None:
        context = current_job()
        await asyncio.sleep(HANDLER_S)
        tally.done[label][context.job_id] += 1
        if context.redelivered:
            tally.redelivered[label] += 1
        if label == "w1" and tally.cut_at is not None:
            tally.after_cut.add(context.job_id)

    return app


def worker_settings(urls: list[str]) -> Settings:
    # Only what the test needs: heartbeat, connect_timeout and connect_attempt_timeout are the
    # defaults under test.
    return Settings(url=",".join(urls), prefetch=PREFETCH, shutdown_grace=5.0)


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def publish(publisher: Publisher, tally: Tally, start: int, count: int) -> None:
    ids = await publisher.publish_many(Work(n=n) for n in range(start, start + count))
    tally.confirmed.update(ids)


async def trickle(publisher: Publisher, tally: Tally, start: int, stop: asyncio.Event) -> None:
    """Keep both workers fed during the cut: TRICKLE_PER_S confirmed jobs a second. Stopped
    between batches, so that every job published is counted as confirmed."""
    n = start
    while not stop.is_set():
        await publish(publisher, tally, n, TRICKLE_PER_S // 4)
        n += TRICKLE_PER_S // 4
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def test_a_silently_partitioned_worker_fails_over_and_loses_nothing(
    cluster: RabbitCluster,
) -> None:
    a, b, c = cluster.nodes
    tally = Tally()
    async with TcpProxy("127.0.0.1", a.amqp_port) as proxy:
        w1 = Worker(build_app(tally, "w1"), worker_settings([proxy.url(), b.url, c.url]))
        w2 = Worker(build_app(tally, "w2"), worker_settings([b.url, c.url, a.url]))
        tasks = [asyncio.create_task(w.run()) for w in (w1, w2)]
        try:
            await until(
                lambda: (w1.ready and w2.ready) or any(t.done() for t in tasks), 60, "ready"
            )
            for task in tasks:
                if task.done():
                    task.result()
            publisher_settings = Settings(url=f"{c.url},{b.url},{a.url}")
            async with Publisher(publisher_settings, exchange="bjpartition") as publisher:
                timings = await cut_worker_1(proxy, publisher, w1, tally)
            await until(lambda: tally.confirmed <= set(tally.completions()), 60, "every job done")
        finally:
            proxy.heal()
            for worker in (w1, w2):
                worker.stop()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    check(tally, timings)


async def cut_worker_1(
    proxy: TcpProxy, publisher: Publisher, w1: Worker, tally: Tally
) -> dict[str, float]:
    """Blackhole worker 1's node while it holds a full prefetch, until it works elsewhere."""
    await publish(publisher, tally, 0, BACKLOG)
    await until(lambda: len(tally.done["w1"]) >= PREFETCH, 30, "worker 1 busy")
    stop_feeding = asyncio.Event()
    feeding = asyncio.create_task(trickle(publisher, tally, BACKLOG, stop_feeding))
    try:
        proxy.blackhole()
        cut = tally.cut_at = time.monotonic()
        await until(lambda: not w1.ready, CUT_MAX_S, "worker 1 unready")
        unready = time.monotonic() - cut
        before = w1.reconnects
        await until(lambda: w1.ready, CUT_MAX_S - unready, "worker 1 ready on another node")
        failover = time.monotonic() - cut
        # Ready while its first node is still silent, with no second connection through it.
        assert proxy.blackholed and proxy.accepted == 1 and w1.reconnects == before + 1
        tally.cut_at = None
        done = len(tally.done["w1"])
        await until(lambda: len(tally.done["w1"]) > done, 20, "worker 1 working again")
    finally:
        stop_feeding.set()
        await asyncio.wait_for(feeding, 30)
    held = time.monotonic() - cut
    proxy.heal()
    return {"unready": unready, "failover": failover, "cut_held": held}


def check(tally: Tally, timings: dict[str, float]) -> None:
    defaults = Settings()
    # aiormq: stuck after (heartbeat + 1) * 3 s without a frame, checked every heartbeat // 2 s.
    detect = (defaults.heartbeat + 1) * 3 + defaults.heartbeat // 2
    limit = detect + defaults.connect_attempt_timeout + SLACK_S
    completions = tally.completions()
    lost = tally.confirmed - set(completions)
    duplicates = sum(completions.values()) - len(completions)
    redone = {i for i in tally.after_cut if completions[i] >= 2}
    report = (
        f"partition: confirmed={len(tally.confirmed)} processed={len(completions)} "
        f"lost={len(lost)} duplicates={duplicates} "
        f"w1_done_on_cut_connection={len(tally.after_cut)} redelivered_and_done_again="
        f"{len(redone)} redeliveries_seen={dict(tally.redelivered)} "
        f"unready_after={timings['unready']:.1f}s failover={timings['failover']:.1f}s "
        f"(limit {limit:g}s) cut_held={timings['cut_held']:.1f}s "
        f"heartbeat={defaults.heartbeat} attempt_timeout={defaults.connect_attempt_timeout:g}"
    )
    print("\n" + report)
    assert not lost, report
    assert set(completions) <= tally.confirmed, report
    assert timings["unready"] <= 2 * defaults.heartbeat + 2, report
    assert timings["failover"] <= limit, report
    # Their acks were lost in the cut: the broker redelivered every one of them.
    assert tally.after_cut and redone == tally.after_cut, report
    assert duplicates <= 2 * PREFETCH, report
