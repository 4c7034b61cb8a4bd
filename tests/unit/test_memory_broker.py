"""The in-memory broker's own behaviour: what the contract suite cannot show on RabbitMQ cheaply
(virtual time, head-only TTLs, bounds of a run) and the real components running on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

from brokerjobs import App, Publisher, RetryPolicy, Worker, job
from brokerjobs.broker.memory import CallbackFailed, MemoryBroker, MemoryChannel, StillBusy
from brokerjobs.envelope import Delivery, OutgoingMessage, new_job_id
from brokerjobs.errors import (
    BrokerUnreachable,
    PublishInterrupted,
    TopologyError,
    TopologyMismatch,
    UnroutableJob,
)
from brokerjobs.settings import Settings
from tests.support.broker import wait_for

DLX = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"}


def message(
    expiration_ms: int | None = None, headers: dict[str, object] | None = None
) -> OutgoingMessage:
    return OutgoingMessage(
        body=b"{}",
        message_id=new_job_id(),
        job_name="t",
        priority=None,
        headers=dict(headers or {}),
        expiration_ms=expiration_ms,
    )


@pytest.fixture
async def memory() -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker()
    async with asyncio.timeout(20):
        yield broker
    broker.drop_connections("test over")


async def open_channel(broker: MemoryBroker, prefetch: int | None = None) -> MemoryChannel:
    return await (await broker.connect("test")).channel(prefetch=prefetch)


async def test_a_message_ttl_fires_only_at_the_head(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    await channel.declare_queue("dead", {})
    await channel.declare_queue("q", DLX)
    first, second = message(expiration_ms=60_000), message(expiration_ms=50)
    await channel.publish(first, "", "q")
    await channel.publish(second, "", "q")
    await memory.advance(1)
    assert memory.queue_depths() == {"dead": 0, "q": 2}  # the short one waits behind the head
    await memory.advance(59)
    assert [d.message_id for d in memory.messages("dead")] == [first.message_id, second.message_id]


async def test_advance_fires_each_ttl_at_its_time_and_delivers_in_between(
    memory: MemoryBroker,
) -> None:
    channel = await open_channel(memory)
    await channel.declare_queue("main", {})
    for name, ttl in (("t1", 1000), ("t3", 3000)):
        await channel.declare_queue(
            name,
            {
                "x-message-ttl": ttl,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "main",
            },
        )
        await channel.publish(message(), "", name)
    seen: list[float] = []

    async def record(delivery: Delivery) -> None:
        seen.append(memory.clock.now)
        await channel.ack(delivery.delivery_tag)

    await channel.consume("main", record)
    assert memory.next_expiry() == 1.0
    await memory.advance(10)
    assert (seen, memory.clock.now, memory.next_expiry()) == ([1.0, 3.0], 10.0, None)


async def test_stored_messages_are_copies_no_handler_can_change(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    await channel.declare_queue("q", {})
    sent = message(headers={"table": {"list": [1]}})
    await channel.publish(sent, "", "q")
    sent.headers["table"]["list"].append(2)
    first = await channel.get("q")
    assert first is not None and first.headers == {"table": {"list": [1]}}
    first.headers["table"]["list"].append(3)
    await channel.nack(first.delivery_tag, requeue=True)
    again = await channel.get("q")
    assert again is not None and again.redelivered and again.headers == {"table": {"list": [1]}}


async def test_a_run_that_never_ends_is_stopped(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    await channel.declare_queue("q", {})

    async def requeue_forever(delivery: Delivery) -> None:
        await channel.nack(delivery.delivery_tag, requeue=True)

    await channel.consume("q", requeue_forever)
    await channel.publish(message(), "", "q")
    with pytest.raises(StillBusy, match="50 deliveries"):
        await memory.run_until_idle(max_deliveries=50)


async def test_a_callback_that_never_returns_is_reported(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    await channel.declare_queue("q", {})
    forever = asyncio.Event()

    async def hang(delivery: Delivery) -> None:
        await forever.wait()

    await channel.consume("q", hang)
    await channel.publish(message(), "", "q")
    with pytest.raises(StillBusy, match="1 delivery callback"):
        await memory.run_until_idle(stuck_after=0.05)
    await channel.close()  # as aiormq: a closing channel cancels its running callbacks
    await memory.run_until_idle()
    assert memory.queue_depths() == {"q": 1}
    assert memory.messages("q")[0].redelivered


async def test_a_failing_callback_is_raised_by_the_run(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    await channel.declare_queue("q", {})

    async def broken(delivery: Delivery) -> None:
        raise ValueError("handler bug")

    await channel.consume("q", broken)
    await channel.publish(message(), "", "q")
    with pytest.raises(CallbackFailed, match="ValueError: handler bug"):
        await memory.run_until_idle()
    await memory.run_until_idle()  # raised once


async def test_a_quorum_queue_dead_letters_past_its_delivery_limit(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    await channel.declare_queue("dead", {})
    await channel.declare_queue("q", {"x-queue-type": "quorum", "x-delivery-limit": 2, **DLX})
    await channel.publish(message(), "", "q")
    counts = []
    for _ in range(3):
        delivery = await channel.get("q")
        assert delivery is not None
        counts.append(delivery.headers.get("x-delivery-count"))
        await channel.nack(delivery.delivery_tag, requeue=True)
    assert counts == [None, 1, 2]
    (dead,) = memory.messages("dead")
    assert dead.headers["x-death"][0]["reason"] == "delivery_limit"


@pytest.mark.parametrize(("version", "last_death"), [((3, 10, 8), False), ((4, 0, 0), True)])
async def test_x_last_death_headers_follow_the_version(
    version: tuple[int, ...], last_death: bool
) -> None:
    memory = MemoryBroker(server_version=version)
    channel = await open_channel(memory)
    assert channel is not None and (await memory.connect("v")).server_version == version
    await channel.declare_queue("dead", {})
    await channel.declare_queue("q", DLX)
    await channel.publish(message(), "", "q")
    delivery = await channel.get("q")
    assert delivery is not None
    await channel.nack(delivery.delivery_tag, requeue=False)
    (dead,) = memory.messages("dead")
    assert ("x-last-death-reason" in dead.headers) is last_death
    assert dead.headers["x-first-death-reason"] == "rejected"


async def test_declaring(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    await channel.declare_queue("q", {"x-message-ttl": 100})
    with pytest.raises(TopologyMismatch, match="received none but current is the value '100'"):
        await channel.declare_queue("q", {})
    assert channel.is_closed
    channel = await open_channel(memory)
    await channel.declare_queue("q", {"x-message-ttl": 100, "x-anything": 1})  # not compared
    await channel.declare_queue("q", {"x-message-ttl": 100, "x-queue-type": "classic"})
    with pytest.raises(TopologyError, match="reserved"):
        await channel.declare_queue("amq.mine", {})
    channel = await open_channel(memory)
    with pytest.raises(TopologyError, match="not one the in-memory broker plays"):
        await channel.declare_exchange("x", "headers")


async def test_an_exclusive_queue_is_locked_to_its_connection(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    private = await channel.declare_private_queue()
    other = await open_channel(memory)
    with pytest.raises(TopologyError, match="RESOURCE_LOCKED"):
        await other.consume(private, lambda d: asyncio.sleep(0))


async def test_routing_by_exchange_kind_and_through_cycles(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    for name, kind in (("direct", "direct"), ("fan", "fanout"), ("a", "topic"), ("b", "topic")):
        await channel.declare_exchange(name, kind)
    await channel.declare_queue("q", {})
    await channel.bind("q", "direct", "exact")
    await channel.bind("q", "fan", "ignored")
    await channel.bind_exchange("b", "a", "#")
    await channel.bind_exchange("a", "b", "#")  # a cycle
    await channel.bind("q", "a", "#")
    await channel.bind("q", "b", "k.*")  # reachable twice: still one copy
    with pytest.raises(UnroutableJob):
        await channel.publish(message(), "direct", "exact.not")
    for exchange, key in (("direct", "exact"), ("fan", "anything"), ("a", "k.v")):
        await channel.publish(message(), exchange, key)
    assert memory.queue_depths() == {"q": 3}


async def test_a_closed_channel_refuses_publishing_as_amqp_does(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    await channel.close()
    with pytest.raises(PublishInterrupted, match="publish it again"):
        await channel.publish(message(), "", "q")
    memory.unreachable = True
    with pytest.raises(BrokerUnreachable):
        await memory.connect("refused")


@job("memory.smoke")
class Smoke(BaseModel):
    n: int


async def test_the_real_worker_retries_parks_and_reconnects_on_it(memory: MemoryBroker) -> None:
    app = App("mem")
    app.queue("mem.q", "memory.#")
    runs: list[tuple[int, float]] = []

    @app.handler(Smoke, queue="mem.q", retry=RetryPolicy(delays=(5.0,), max_attempts=2))
    async def handle(task: Smoke) -> None:
        runs.append((task.n, memory.clock.now))
        if task.n == 2 or len(runs) == 1:
            raise RuntimeError("fails")

    settings = Settings(url="amqp://unused:1/", shutdown_grace=1.0)
    worker = Worker(app, settings, broker=memory)
    running = asyncio.create_task(worker.run())
    await wait_for(lambda: worker.ready)
    async with Publisher(settings, exchange=app.exchange, broker=memory) as publisher:
        await publisher.publish_many([Smoke(n=1), Smoke(n=2)])
        await memory.advance(5)
        assert sorted(runs) == [(1, 0.0), (1, 5.0), (2, 0.0), (2, 5.0)]
        assert memory.queue_depths()["mem.q.parked"] == 1
        memory.drop_connections()
        await wait_for(lambda: worker.ready and not memory.connections[-1].is_closed)
        await publisher.publish(Smoke(n=3))  # its connection was lost too: it reconnects
        await memory.run_until_idle()
    assert runs[-1] == (3, 5.0)
    worker.stop()
    await running


async def test_run_until_idle_can_advance_through_every_ttl(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    await channel.declare_queue("dead", {})
    await channel.declare_queue("q", DLX)
    await channel.publish(message(expiration_ms=2500), "", "q")
    await memory.run_until_idle()
    assert memory.clock.now == 0.0
    await memory.run_until_idle(advance_clock=True)
    assert (memory.clock.now, memory.queue_depths()) == (2.5, {"dead": 1, "q": 0})


async def test_channels_the_broker_closed_are_recorded(memory: MemoryBroker) -> None:
    channel = await open_channel(memory)
    await channel.ack(7)  # returns: RabbitMQ closes the channel only afterwards
    assert channel.is_closed and channel.closing.result() is channel.close_reason
    with pytest.raises(TopologyError):
        await (await open_channel(memory)).get("missing")
    assert memory.channel_failures == [
        "PRECONDITION_FAILED - unknown delivery tag 7 (settled twice?)",
        "reading 'missing': queue 'missing' does not exist: run `brokerjobs topology declare "
        "MODULE:APP`",
    ]


async def test_a_declared_plan_delays_a_publish_through_its_delay_levels(
    memory: MemoryBroker,
) -> None:
    app = App("delayed", delay_levels=3)
    app.queue("delayed.q", "memory.#")
    await memory.declare_plan(app.topology())
    await memory.declare_plan(app.topology())  # idempotent
    settings = Settings(url="amqp://unused:1/")
    async with Publisher(settings, exchange=app.exchange, delay_levels=3, broker=memory) as pub:
        await pub.publish(Smoke(n=1), delay=5)
    await memory.advance(4.999)
    assert memory.queue_depths()["delayed.q"] == 0
    await memory.advance(0.001)
    (arrived,) = memory.messages("delayed.q")
    assert arrived.routing_key.endswith("memory.smoke")
