"""The node-failure run of ``test_cluster_faults``: the clients (a worker and a publisher, each
through a FailoverProxy), the faults, the recovery, and the tally of every job."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from pydantic import BaseModel

from brokerjobs import App, Publisher, PublishError, RetryPolicy, Settings, Worker, current_job, job
from brokerjobs.broker.amqp import connect
from brokerjobs.topology import TopologyPlan
from tests.support import cluster_queries
from tests.support.cluster import Node, RabbitCluster
from tests.support.cluster_processes import ClusterError
from tests.support.failover_proxy import FailoverProxy

log = logging.getLogger("tests.cluster")

TOTAL = 2000
BATCH = 25
PREFETCH = 50
FAIL_EVERY = 10  # job n with n % 10 == 3 fails on its first attempt and goes through a retry tier
PUBLISH_GIVE_UP_S = 60.0
PROCESS_LIMIT_S = 90.0  # all confirmed jobs processed within this after the last publish...
STALL_S = 15.0  # ...and never this long without progress


@job("cluster.work")
class Work(BaseModel):
    n: int


@dataclass
class Tally:
    confirmed: set[str] = field(default_factory=set)
    completions: collections.Counter[str] = field(default_factory=collections.Counter)
    attempts: collections.Counter[int] = field(default_factory=collections.Counter)
    publish_errors: int = 0  # publishes that still failed after the Publisher's own retries
    quota: int = 0
    quota_raised: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def processed(self) -> set[str]:
        return set(self.completions)

    @property
    def duplicates(self) -> int:
        return sum(self.completions.values()) - len(self.completions)

    def allow(self, quota: int) -> None:
        self.quota = quota
        self.quota_raised.set()


def settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "url": url,
        "heartbeat": 5,
        "connect_timeout": 20.0,
        "confirm_timeout": 5.0,
        "shutdown_grace": 5.0,
        "prefetch": PREFETCH,
    }
    values.update(overrides)
    return Settings(**values)


def build_app(tally: Tally) -> App:
    app = App("bjcluster", queue_kind="quorum")

    @app.handler(Work, retry=RetryPolicy(delays=(0.5,), max_attempts=3))
    async def work(task: Work) -> None:
        context = current_job()
        tally.attempts[context.attempt] += 1
        if task.n % FAIL_EVERY == 3 and context.attempt == 1:
            raise RuntimeError("first attempt fails on purpose")
        await asyncio.sleep(0.002)
        tally.completions[context.job_id] += 1

    return app


async def publish_all(publisher: Publisher, tally: Tally) -> None:
    """Publish TOTAL jobs in concurrent batches, never past the quota the fault driver sets."""
    n = 0
    while n < TOTAL:
        while n >= tally.quota:
            tally.quota_raised.clear()
            await tally.quota_raised.wait()
        batch = [(f"job-{i:05d}", Work(n=i)) for i in range(n, min(n + BATCH, TOTAL, tally.quota))]
        pending = dict(batch)
        give_up = time.monotonic() + PUBLISH_GIVE_UP_S
        while pending:
            if time.monotonic() > give_up:
                raise AssertionError(
                    f"{len(pending)} publish(es) still unconfirmed after {PUBLISH_GIVE_UP_S}s "
                    f"of retries: {sorted(pending)[:5]}"
                )
            results = await asyncio.gather(
                *(publisher.publish(w, job_id=i) for i, w in pending.items()),
                return_exceptions=True,
            )
            for (job_id, _), result in zip(list(pending.items()), results, strict=True):
                if isinstance(result, PublishError):
                    tally.publish_errors += 1
                    log.warning("publish of %s failed: %r", job_id, result)
                elif isinstance(result, BaseException):
                    raise result
                else:
                    tally.confirmed.add(job_id)
                    del pending[job_id]
            if pending:
                log.warning("retrying %d unconfirmed publish(es) with the same ids", len(pending))
                await asyncio.sleep(0.5)
        n += len(batch)
        await asyncio.sleep(0.05)  # <= 500 jobs/s, so that each fault lands mid-stream


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_processed(tally: Tally, worker_task: asyncio.Task[None]) -> None:
    """Until every confirmed job is processed; fails after STALL_S without progress."""
    deadline = time.monotonic() + PROCESS_LIMIT_S
    seen, last_progress = -1, time.monotonic()
    while not tally.confirmed <= tally.processed and not worker_task.done():
        now = time.monotonic()
        if len(tally.processed) != seen:
            seen, last_progress = len(tally.processed), now
        if now - last_progress > STALL_S or now > deadline:
            missing = len(tally.confirmed - tally.processed)
            raise AssertionError(f"{missing} confirmed job(s) not processed")
        await asyncio.sleep(0.05)


async def held_in_dead_letter_state(
    cluster: RabbitCluster, via: Node, topology: TopologyPlan, note: Callable[[str], None]
) -> int:
    """Log every queue's Raft-state counts; return the dead letters held in the retry tiers."""
    held = 0
    with contextlib.suppress(ClusterError):
        names = [q.name for q in topology.queues]
        counters = await asyncio.to_thread(cluster_queries.queue_counters, cluster, names, via)
        note(f"broker counters (stats sees messages_ready only): {counters}")
    for queue in topology.queues:
        with contextlib.suppress(ClusterError):
            overview = await asyncio.to_thread(
                cluster_queries.fifo_overview, cluster, queue.name, via
            )
            note(f"{queue.name}: {overview}")
            if queue.role == "retry":
                held += overview.get("num_discarded", 0) + overview.get(
                    "num_discard_checked_out", 0
                )
    return held


async def finish_worker(worker: Worker, task: asyncio.Task[None]) -> None:
    worker.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 30)


def dropped_channels(caplog: pytest.LogCaptureFixture) -> int:
    """Channels the confirm watchdog gave up on (publishes stuck after a node loss)."""
    return sum("dropping AMQP channel" in record.getMessage() for record in caplog.records)


async def queue_depths(url: str, names: list[str]) -> dict[str, int]:
    connection = await connect(settings(url, connect_timeout=5.0), "cluster-test-inspect")
    try:
        channel = await connection.channel(confirms=False)
        return {name: (await channel.inspect_queue(name)).messages for name in names}
    finally:
        await connection.close()


class ClusterRun:
    """One run of the node-failure test: its clients through failover proxies, the two faults,
    the recovery when jobs are missing, and what it saw on the way."""

    worker: Worker
    worker_task: asyncio.Task[None]

    def __init__(self, cluster: RabbitCluster) -> None:
        self.started = time.monotonic()
        self.cluster = cluster
        a, b, c = cluster.nodes
        self.tally = Tally()
        self.app = build_app(self.tally)
        self.topology = self.app.topology()
        self.main = self.topology.main_queues[0].name
        self.all_queues = [q.name for q in self.topology.queues]
        self.worker_proxy = FailoverProxy([a.amqp_port, b.amqp_port, c.amqp_port])
        self.publisher_proxy = FailoverProxy([b.amqp_port, c.amqp_port, a.amqp_port])
        self.publishing: asyncio.Task[None] | None = None
        self.events: list[str] = []
        self.stuck: set[str] = set()
        self.stranded = 0  # dead letters held in the retry tiers' at-least-once dead-letter state
        self.held_before_heal = 0  # of those, still missing until the killed node came back
        self.reconnects = 0
        self.depths: dict[str, int] = {}
        self.leader = self.survivor = a  # the second fault's victim and a node that survives it

    async def start(self) -> None:
        await self.worker_proxy.start()
        await self.publisher_proxy.start()
        self.start_worker()

    def start_worker(self) -> None:
        self.worker = Worker(self.app, settings(self.worker_proxy.url))
        self.worker_task = asyncio.create_task(self.worker.run())

    def note(self, event: str) -> None:
        line = f"{time.monotonic() - self.started:6.1f}s {event}"
        self.events.append(line)
        log.warning("cluster test: %s", line)

    async def progress(self) -> None:
        tally = self.tally
        while True:
            await asyncio.sleep(5)
            self.note(
                f"progress: {len(tally.confirmed)} confirmed, {len(tally.processed)} processed"
            )

    async def worker_ready(self) -> None:
        worker, task = self.worker, self.worker_task
        await wait_until(lambda: worker.ready or task.done(), 30, "the worker to be ready")
        if task.done():
            task.result()
        a, b, _ = self.cluster.nodes
        first_leader = await asyncio.to_thread(cluster_queries.leader, self.cluster, self.main, b)
        self.note(f"worker ready on {a.nodename}; {self.main} leader {first_leader.nodename}")

    async def publish_through_two_faults(self, publisher: Publisher) -> None:
        cluster, tally, (a, b, c) = self.cluster, self.tally, self.cluster.nodes
        tally.allow(700)
        publishing = self.publishing = asyncio.create_task(publish_all(publisher, tally))

        # Fault 1: SIGKILL the publisher's node (a follower) mid-stream, restart it, catch up.
        await wait_until(lambda: len(tally.confirmed) >= 300 or publishing.done(), 60, "300")
        self.note(
            f"SIGKILL {b.nodename} (the publisher's node) at {len(tally.confirmed)} confirmed"
        )
        await asyncio.to_thread(cluster.kill, b)
        tally.allow(1200)
        await asyncio.sleep(2)
        await asyncio.to_thread(cluster.restart, b)
        self.note(f"restarted {b.nodename}")
        await asyncio.to_thread(cluster_queries.wait_caught_up, cluster, self.all_queues, a)
        self.note(f"all quorum members caught up ({len(tally.confirmed)} confirmed)")

        # Fault 2: SIGKILL the main queue's leader while jobs are still being published.
        leader = self.leader = await asyncio.to_thread(
            cluster_queries.leader, cluster, self.main, c
        )
        tally.allow(1600)
        await wait_until(lambda: len(tally.confirmed) >= 1300 or publishing.done(), 60, "1300")
        self.note(f"SIGKILL leader {leader.nodename} at {len(tally.confirmed)} confirmed")
        await asyncio.to_thread(cluster.kill, leader)
        tally.allow(TOTAL)
        self.survivor = next(n for n in cluster.nodes if n is not leader)

        await asyncio.wait_for(publishing, 2 * PUBLISH_GIVE_UP_S)
        self.note(f"publisher done: {len(tally.confirmed)} confirmed")

    async def tell_stuck_from_lost(self) -> None:
        """After a stall: a fresh connection gets every unacked delivery back."""
        tally = self.tally
        self.stuck = tally.confirmed - tally.processed
        self.stranded = await held_in_dead_letter_state(
            self.cluster, self.survivor, self.topology, self.note
        )
        self.note(
            f"{len(self.stuck)} job(s) not processed and no progress for {STALL_S:g}s: "
            "restarting the worker to tell jobs stuck unacked from lost ones"
        )
        await finish_worker(self.worker, self.worker_task)
        self.reconnects += self.worker.reconnects
        self.start_worker()
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: tally.confirmed <= tally.processed, 30, "recovery")
        self.stuck &= tally.processed
        if self.stranded and not tally.confirmed <= tally.processed:
            await self.heal()

    async def heal(self) -> None:
        """What operations would do next anyway: bring the killed node back."""
        tally, cluster, survivor = self.tally, self.cluster, self.survivor
        self.held_before_heal = len(tally.confirmed - tally.processed)
        self.note(f"{self.held_before_heal} still missing: restarting {self.leader.nodename}")
        await asyncio.to_thread(cluster.restart, self.leader)
        await asyncio.to_thread(cluster_queries.wait_caught_up, cluster, self.all_queues, survivor)
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: tally.confirmed <= tally.processed, 60, "heal")
        self.note(f"after the heal: {len(tally.confirmed - tally.processed)} missing")
        await held_in_dead_letter_state(cluster, survivor, self.topology, self.note)

    async def settle(self) -> None:
        if self.worker_task.done():
            self.worker_task.result()
        self.depths = await queue_depths(self.survivor.url, self.all_queues)
        new_leader = await asyncio.to_thread(
            cluster_queries.leader, self.cluster, self.main, self.survivor
        )
        self.note(f"done; {self.main} leader now {new_leader.nodename}; depths {self.depths}")

    async def close(self) -> None:
        if self.publishing is not None:
            self.publishing.cancel()
            await asyncio.gather(self.publishing, return_exceptions=True)
        await finish_worker(self.worker, self.worker_task)
        await self.worker_proxy.close()
        await self.publisher_proxy.close()
        self.reconnects += self.worker.reconnects

    def report(self, caplog: pytest.LogCaptureFixture) -> str:
        tally, elapsed = self.tally, time.monotonic() - self.started
        lost = tally.confirmed - tally.processed
        return (
            f"confirmed={len(tally.confirmed)} processed={len(tally.processed)} lost={len(lost)} "
            f"duplicates={tally.duplicates} stuck={len(self.stuck)} "
            f"stranded_in_dlx={self.stranded} held_until_heal={self.held_before_heal} "
            f"channels_dropped={dropped_channels(caplog)} "
            f"attempts={dict(sorted(tally.attempts.items()))} "
            f"worker_reconnects={self.reconnects} publish_errors_retried={tally.publish_errors} "
            f"worker_connections={self.worker_proxy.connections} "
            f"publisher_connections={self.publisher_proxy.connections} test_time={elapsed:.1f}s"
        )
