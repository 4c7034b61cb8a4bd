"""Core behaviour against the real broker: routing, priority, concurrency, publish errors."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from pydantic import BaseModel

from brokerjobs import App, Publisher, UnroutableJob, job
from brokerjobs.envelope import ATTEMPT
from tests.support.broker import TEST_URL, Broker, make_settings, running_worker, unique, wait_for
from tests.support.matrix import delivery_order


@job("order.created")
class OrderCreated(BaseModel):
    order_id: int


@job("order.paid.card")
class OrderPaid(BaseModel):
    order_id: int


@job("report.render")
class RenderReport(BaseModel):
    n: int


async def test_two_queues_with_different_patterns_receive_exactly_their_jobs(
    broker: Broker,
) -> None:
    app = App(unique("routing"))
    seen: dict[str, list[int]] = {"all": [], "created": []}
    app.queue(f"{app.name}.all", "order.#")
    app.queue(f"{app.name}.created", "order.created")

    @app.handler(OrderCreated, queue=f"{app.name}.all")
    async def all_created(task: OrderCreated) -> None:
        seen["all"].append(task.order_id)

    @app.handler(OrderPaid, queue=f"{app.name}.all")
    async def all_paid(task: OrderPaid) -> None:
        seen["all"].append(-task.order_id)

    @app.handler(OrderCreated, queue=f"{app.name}.created")
    async def created_only(task: OrderCreated) -> None:
        seen["created"].append(task.order_id)

    broker.track(app)
    async with running_worker(app):
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            await publisher.publish_many([OrderCreated(order_id=i) for i in range(1, 4)])
            await publisher.publish_many([OrderPaid(order_id=i) for i in range(1, 3)])
        await wait_for(lambda: len(seen["all"]) == 5 and len(seen["created"]) == 3)

    assert sorted(seen["all"]) == [-2, -1, 1, 2, 3]
    assert sorted(seen["created"]) == [1, 2, 3]


async def test_higher_priority_jobs_are_delivered_first_at_prefetch_one(broker: Broker) -> None:
    """Strictly on a classic queue that asks for priorities; on a quorum queue as the broker's
    version does it (none on 3.x, two levels on 4.0-4.2, 0-31 on 4.3+)."""
    app = App(unique("prio"))
    queue = app.queue(f"{app.name}.reports", "report.render", max_priority=9)
    order: list[str] = []

    @app.handler(RenderReport, queue=queue)
    async def render(task: RenderReport) -> None:
        order.append(str(task.n))

    broker.track(app)
    async with running_worker(app, make_settings(prefetch=1)) as worker:
        worker.stop()  # declare the topology, then stop consuming so the queue fills up
    published = [("0", 0), ("1", 1), ("9", 9), ("5", 5), ("3", 3)]
    async with Publisher(make_settings(), exchange=app.exchange) as publisher:
        for n, priority in published:
            await publisher.publish(RenderReport(n=int(n)), priority=priority)
    async with running_worker(app, make_settings(prefetch=1)):
        await wait_for(lambda: len(order) == 5)
    version = broker.connection.server_version
    assert order == delivery_order(published, queue.kind, 9, version)
    if queue.kind == "classic" or version >= (4, 3):
        assert order == ["9", "5", "3", "1", "0"]


async def test_peak_concurrent_handlers_equals_prefetch(broker: Broker) -> None:
    app = App(unique("conc"))
    running = 0
    peak = 0
    done = 0
    release = asyncio.Event()

    @app.handler(RenderReport)
    async def slow(task: RenderReport) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        done += 1

    broker.track(app)
    async with running_worker(app, make_settings(prefetch=7)):
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            await publisher.publish_many([RenderReport(n=i) for i in range(30)])
        await wait_for(lambda: running == 7)
        await asyncio.sleep(0.2)  # give the broker the chance to over-deliver, if it would
        assert peak == 7
        release.set()
        await wait_for(lambda: done == 30)
    assert peak == 7


async def test_unroutable_publish_raises(broker: Broker) -> None:
    app = App(unique("unroutable"))

    @app.handler(OrderCreated)
    async def handle(task: OrderCreated) -> None: ...

    broker.track(app)
    async with running_worker(app):
        pass
    async with Publisher(make_settings(), exchange=app.exchange) as publisher:
        with pytest.raises(UnroutableJob, match="report.render"):
            await publisher.publish(RenderReport(n=1))
        with pytest.raises(UnroutableJob):
            await publisher.publish_many([OrderCreated(order_id=1), RenderReport(n=2)])
        # The routable job of the batch was confirmed and is queued.
        await wait_for(lambda: broker.depth_is(f"{app.name}.order.created", 1))


async def test_published_message_follows_the_documented_wire_format(broker: Broker) -> None:
    app = App(unique("wire"))

    @app.handler(OrderCreated)
    async def handle(task: OrderCreated) -> None: ...

    broker.track(app)
    async with running_worker(app):
        pass
    async with Publisher(make_settings(), exchange=app.exchange) as publisher:
        job_id = await publisher.publish(OrderCreated(order_id=42), priority=3)
    [delivery] = await broker.drain(f"{app.name}.order.created")
    assert delivery.body == b'{"order_id":42}'
    assert delivery.message_id == job_id
    assert delivery.job_name == "order.created"
    assert delivery.content_type == "application/json"
    assert delivery.priority == 3
    assert delivery.timestamp is not None
    assert delivery.persistent
    assert delivery.headers[ATTEMPT] == 1


@job("math.cube")
class Cube(BaseModel):
    n: int
    out: str


def cube_in_another_process(task: Cube) -> None:
    with open(task.out, "a") as out:
        out.write(f"{task.n**3} {os.getpid()}\n")


async def test_process_handlers_run_outside_the_worker_process(
    broker: Broker, tmp_path: Path
) -> None:
    out = tmp_path / "cubes.txt"
    app = App(unique("proc"))
    app.handler(Cube, run_in="process")(cube_in_another_process)
    broker.track(app)
    async with running_worker(app):
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            await publisher.publish_many([Cube(n=n, out=str(out)) for n in range(3)])
        await wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 3)
    rows = [line.split() for line in out.read_text().splitlines()]
    assert sorted(int(cube) for cube, _ in rows) == [0, 1, 8]
    assert all(int(pid) != os.getpid() for _, pid in rows)


async def test_a_job_from_a_plain_amqp_client_that_follows_the_wire_format_is_processed(
    broker: Broker,
) -> None:
    import aio_pika

    app = App(unique("foreign"))
    seen: list[tuple[int, int]] = []

    @app.handler(OrderCreated)
    async def handle(task: OrderCreated) -> None:
        from brokerjobs import current_job

        seen.append((task.order_id, current_job().attempt))

    broker.track(app)
    async with running_worker(app):
        connection = await aio_pika.connect(TEST_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(app.exchange)
            minimal = aio_pika.Message(b'{"order_id": 7}', delivery_mode=2)  # no type, no headers
            full = aio_pika.Message(
                b'{"order_id": 8}',
                content_type="application/json",
                type="order.created",
                message_id="from-go-service-1",
                priority=1,
                headers={"bj-attempt": 1, "bj-schema-version": 1},
                delivery_mode=2,
            )
            await exchange.publish(minimal, "order.created", mandatory=True)
            await exchange.publish(full, "order.created", mandatory=True)
        await wait_for(lambda: len(seen) == 2)
    assert sorted(seen) == [(7, 1), (8, 1)]
