"""Measure whether killing a quorum leader strands at-least-once dead letters, and for how long.

Not a test (slow, and the outcome is the broker's): ``python -m tests.cluster.leader_kill
--runs 5 [--split] [--dlx-confirm-timeout-ms N] [--chroot /srv/rmq4]`` starts one 3-node
cluster (``--chroot``: of the RabbitMQ installed there, e.g. 4.0 in a Debian 13 chroot) and per run:
declares a fresh quorum app from one node (so that node leads the main queue, its 1 s retry
tier and its parking queue; with ``--split`` the retry tier is led by a node that survives),
publishes jobs that all fail once, SIGKILLs that node mid-stream, restarts it 10 s later, and
samples every second what the broker holds: per queue ``messages_ready`` (all that AMQP's
declare-ok, hence ``brokerjobs stats``, shows) and ``messages_dlx`` (dead letters waiting for
the target's confirm). A run ends when every confirmed job completed, or at ``--cap``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from brokerjobs import App, Publisher, RetryPolicy, Settings, Worker, current_job, job
from brokerjobs.broker.amqp import connect
from brokerjobs.topology import QueuePlan
from tests.support import cluster_queries
from tests.support.cluster import Node, RabbitCluster, running_cluster
from tests.support.cluster_processes import ClusterError

JOBS = 1000
RESTART_AFTER_S = 10.0


@job("leaderkill.work")
class Work(BaseModel):
    n: int


def build_app(name: str, done: collections.Counter[str]) -> App:
    app = App(name, queue_kind="quorum")

    @app.handler(Work, retry=RetryPolicy(delays=(1,), max_attempts=3))
    async def work(task: Work) -> None:
        if current_job().attempt == 1:
            raise RuntimeError("every job fails once: all go through the 1 s retry tier")
        done[current_job().job_id] += 1

    return app


async def sample(cluster: RabbitCluster, queues: list[str], via: Node) -> dict[str, Any]:
    try:
        return await asyncio.to_thread(cluster_queries.queue_counters, cluster, queues, via)
    except ClusterError as exc:
        return {"error": str(exc)[:120]}


async def lead_from(node: Node, queue: QueuePlan) -> None:
    """Declare ``queue`` through ``node``: RabbitMQ places a new quorum queue's leader on the
    node the declaring client is connected to (queue_leader_locator client-local)."""
    connection = await connect(Settings(url=node.url), "leader-kill")
    try:
        await (await connection.channel(confirms=False)).declare_queue(queue.name, queue.arguments)
    finally:
        await connection.close()


async def leaders(cluster: RabbitCluster, queues: list[str], via: Node) -> dict[str, str]:
    """Each queue's leader node, by name."""
    return {
        q: (await asyncio.to_thread(cluster_queries.leader, cluster, q, via)).name for q in queues
    }


async def publish_killing(
    cluster: RabbitCluster, app: App, leader: Node, others: list[Node], confirmed: set[str]
) -> float:
    """Publish JOBS in batches of 50 (confirmed ids into ``confirmed``), SIGKILLing ``leader``
    after the batch from 300; returns when it was killed."""
    publisher_urls = ",".join(n.url for n in [*others, leader])
    async with Publisher(Settings(url=publisher_urls), exchange=app.exchange) as publisher:
        for start in range(0, JOBS, 50):
            confirmed.update(
                await publisher.publish_many(Work(n=n) for n in range(start, start + 50))
            )
            await asyncio.sleep(0.3)
            if start == 300:
                await asyncio.to_thread(cluster.kill, leader)
                killed = time.monotonic()
    return killed


async def one_run(cluster: RabbitCluster, index: int, cap: float, split: bool) -> dict[str, Any]:
    leader = cluster.nodes[index % 3]
    others = [n for n in cluster.nodes if n is not leader]
    done: collections.Counter[str] = collections.Counter()
    app = build_app(f"bjlk{index}x{int(time.time()) % 10000}", done)
    queues = [q.name for q in app.topology().queues]
    retry = next(q.name for q in app.topology().queues if q.role == "retry")
    if split:  # the retry tier (and its dead-letter worker) on a node that survives
        await lead_from(others[0], app.topology().queue(retry))
    worker = Worker(app, Settings(url=",".join(n.url for n in [leader, *others]), prefetch=50))
    running = asyncio.create_task(worker.run())
    confirmed: set[str] = set()
    timeline: list[str] = []
    try:
        while not worker.ready:  # noqa: ASYNC110 (a property, no event to wait on)
            await asyncio.sleep(0.05)
        placed = await leaders(cluster, queues, others[0])
        killed = await publish_killing(cluster, app, leader, others, confirmed)
        result = await watch(cluster, worker, done, confirmed, queues, retry, others[0], killed,
                             leader, cap, timeline)  # fmt: skip
        result.update(run=index, leader=leader.name, placed=placed)
        return result
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 30)
        if not leader.is_running():
            await asyncio.to_thread(cluster.restart, leader)
        await asyncio.to_thread(
            cluster_queries.wait_caught_up, cluster, queues, cluster.nodes[0], 120
        )


async def watch(cluster: RabbitCluster, worker: Worker, done: collections.Counter[str],
                confirmed: set[str], queues: list[str], retry: str, via: Node, killed: float,
                leader: Node, cap: float, timeline: list[str]) -> dict[str, Any]:  # fmt: skip
    held_max, held_since, held_last = 0, None, None
    restarted = False
    while time.monotonic() - killed < cap:
        now = time.monotonic() - killed
        if not restarted and now >= RESTART_AFTER_S:
            await asyncio.to_thread(cluster.restart, leader)
            restarted = True
            timeline.append(f"{now:6.1f}s restarted {leader.name}")
        counters = await sample(cluster, queues, via)
        tier = counters.get(retry, {})
        held = tier.get("messages_dlx", 0) if isinstance(tier, dict) else 0
        if held:
            held_max = max(held_max, held)
            held_since = held_since if held_since is not None else now
            held_last = now
        missing = len(confirmed - set(done))
        timeline.append(f"{now:6.1f}s missing={missing} retry_tier={tier}")
        if not missing and len(confirmed) == JOBS:
            break
        await asyncio.sleep(1.0)
    missing = len(confirmed - set(done))
    return {
        "confirmed": len(confirmed),
        "processed": len(done),
        "missing_at_end": missing,
        "duplicates": sum(done.values()) - len(done),
        "held_max": held_max,
        "held_first_seen_s": held_since,
        "held_last_seen_s": held_last,
        "all_done_after_kill_s": round(time.monotonic() - killed, 1) if not missing else None,
        "worker_reconnects": worker.reconnects,
        "timeline": timeline,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cap", type=float, default=420.0)
    parser.add_argument("--dlx-confirm-timeout-ms", type=int, default=None)
    parser.add_argument("--split", action="store_true", help="retry tier led by a survivor")
    parser.add_argument("--chroot", type=Path, help="another RabbitMQ, e.g. /srv/rmq4 (4.0)")
    args = parser.parse_args()
    timeout = args.dlx_confirm_timeout_ms
    with running_cluster(dlx_confirm_timeout_ms=timeout, chroot=args.chroot) as cluster:
        print(cluster.ctl(cluster.nodes[0], "eval", "rabbit_misc:version()."), flush=True)
        for index in range(args.runs):
            result = await one_run(cluster, index, args.cap, args.split)
            timeline = result.pop("timeline")
            print(json.dumps(result), flush=True)
            for i, line in enumerate(timeline):
                if i % 10 == 0 or "restarted" in line or "messages_dlx': 0" not in line:
                    print("   ", line, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
