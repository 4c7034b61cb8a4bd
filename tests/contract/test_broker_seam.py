"""The broker seam's contract: each scenario on the in-memory broker and on RabbitMQ.

Every test runs ``[memory]`` and ``[rabbitmq]`` with the same assertions; TTLs are short (100 ms)
so RabbitMQ's run stays quick, and in memory the virtual clock moves instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from brokerjobs.broker.base import Broker, BrokerChannel, BrokerConnection
from brokerjobs.broker.memory import MemoryBroker, MemoryChannel, MemoryConnection
from brokerjobs.errors import (
    ConnectionLost,
    PublishError,
    TopologyError,
    TopologyMismatch,
    UnroutableJob,
)
from tests.contract.seam import Inbox, Seam, bounded, depth_is, message, open_seam

LIMIT_S = 20.0


@pytest.fixture(params=["memory", "rabbitmq"])
async def seam(request: pytest.FixtureRequest) -> AsyncIterator[Seam]:
    if request.param == "rabbitmq":
        request.getfixturevalue("_require_broker")
    async with open_seam(request.param) as opened:
        yield opened


def _as_seam(
    broker: MemoryBroker, connection: MemoryConnection, channel: MemoryChannel
) -> tuple[Broker, BrokerConnection, BrokerChannel]:
    return broker, connection, channel  # type-checks only if the classes fill the Protocols


async def test_the_memory_broker_fills_the_protocols() -> None:
    broker = MemoryBroker()
    connection = await broker.connect("check")
    assert _as_seam(broker, connection, await connection.channel())


@bounded(LIMIT_S)
async def test_publish_consume_ack(seam: Seam) -> None:
    connection = await seam.connect()
    channel = await connection.channel()
    exchange = await seam.exchange(channel)
    queue = await seam.queue(channel)
    await channel.bind(queue, exchange, "jobs.#")
    inbox = Inbox()
    await channel.consume(queue, inbox.put)
    sent = message(headers={"k": {"nested": [1, 2]}, "n": 7})
    await channel.publish(sent, exchange, "jobs.send")
    await seam.until(inbox.has(1))
    got = inbox[0]
    assert (got.body, got.message_id, got.job_name) == (sent.body, sent.message_id, "seam.job")
    assert (got.exchange, got.routing_key, got.redelivered) == (exchange, "jobs.send", False)
    assert got.headers == {"k": {"nested": [1, 2]}, "n": 7}
    assert got.delivery_mode == 2
    await channel.ack(got.delivery_tag)
    await channel.close()  # an unacked delivery would be back in the queue now
    probe = await connection.channel()
    assert await probe.inspect_queue(queue) == type(await probe.inspect_queue(queue))(queue, 0, 0)


@bounded(LIMIT_S)
async def test_nack_with_requeue_redelivers(seam: Seam) -> None:
    channel = await (await seam.connect()).channel()
    queue = await seam.queue(channel)
    inbox = Inbox()
    await channel.consume(queue, inbox.put)
    sent = message()
    await channel.publish(sent, "", queue)
    await seam.until(inbox.has(1))
    await channel.nack(inbox[0].delivery_tag, requeue=True)
    await seam.until(inbox.has(2))
    assert [d.redelivered for d in inbox.deliveries] == [False, True]
    assert inbox[1].message_id == sent.message_id
    await channel.ack(inbox[1].delivery_tag)


@bounded(LIMIT_S)
async def test_nack_without_requeue_dead_letters_with_x_death(seam: Seam) -> None:
    channel = await (await seam.connect()).channel()
    target = await seam.queue(channel)
    dlx = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": target}
    queue = await seam.queue(channel, dlx)
    await channel.publish(message(headers={"own": "kept"}), "", queue)
    delivery = await channel.get(queue)
    assert delivery is not None
    await channel.nack(delivery.delivery_tag, requeue=False)
    await seam.until(lambda: depth_is(channel, target, 1))
    dead = await channel.get(target)
    assert dead is not None and dead.message_id == delivery.message_id
    assert (dead.exchange, dead.routing_key, dead.headers["own"]) == ("", target, "kept")
    death = dead.headers["x-death"][0]
    assert (death["reason"], death["queue"], death["count"]) == ("rejected", queue, 1)
    assert (death["exchange"], death["routing-keys"]) == ("", [queue])
    assert dead.headers["x-first-death-reason"] == "rejected"
    assert dead.headers["x-first-death-queue"] == queue
    assert dead.headers["x-first-death-exchange"] == ""


@bounded(LIMIT_S)
async def test_a_ttl_tier_dead_letters_back_to_its_queue(seam: Seam) -> None:
    channel = await (await seam.connect()).channel()
    main = await seam.queue(channel)
    tier = await seam.queue(
        channel,
        {"x-message-ttl": 100, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": main},
    )
    await channel.publish(message(), "", tier)
    await seam.until(lambda: depth_is(channel, main, 1), after=0.1)
    back = await channel.get(main)
    assert back is not None and not back.redelivered
    death = back.headers["x-death"][0]
    assert (death["reason"], death["queue"], death["count"]) == ("expired", tier, 1)
    assert "original-expiration" not in death
    assert (await channel.inspect_queue(tier)).messages == 0


@bounded(LIMIT_S)
async def test_a_message_expiration_dead_letters_and_is_dropped_from_the_copy(seam: Seam) -> None:
    channel = await (await seam.connect()).channel()
    main = await seam.queue(channel)
    waiting = await seam.queue(
        channel, {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": main}
    )
    await channel.publish(message(expiration_ms=100), "", waiting)
    await seam.until(lambda: depth_is(channel, main, 1), after=0.1)
    back = await channel.get(main)
    assert back is not None and back.expiration is None
    death = back.headers["x-death"][0]
    assert (death["reason"], death["original-expiration"]) == ("expired", "100")


@bounded(LIMIT_S)
async def test_priorities_order_a_priority_queue(seam: Seam) -> None:
    channel = await (await seam.connect()).channel()
    queue = await seam.queue(channel, {"x-max-priority": 5})
    for priority in (1, 5, None, 3):
        await channel.publish(message(priority=priority), "", queue)
    got = [await channel.get(queue) for _ in range(4)]
    assert [d.priority if d else "missing" for d in got] == [5, 3, 1, None]


@bounded(LIMIT_S)
async def test_prefetch_limits_unacked_deliveries_per_consumer(seam: Seam) -> None:
    connection = await seam.connect()
    channel = await connection.channel(prefetch=2)
    probe = await connection.channel()
    queue = await seam.queue(probe)
    inbox = Inbox()
    await channel.consume(queue, inbox.put)
    for _ in range(5):
        await probe.publish(message(), "", queue)

    async def holding(delivered: int, ready: int) -> bool:
        return len(inbox) == delivered and await depth_is(probe, queue, ready)

    await seam.until(lambda: holding(2, 3))
    await channel.ack(inbox[0].delivery_tag)
    await seam.until(lambda: holding(3, 2))


@bounded(LIMIT_S)
async def test_consumers_of_one_queue_take_turns(seam: Seam) -> None:
    connection = await seam.connect()
    first, second, publisher = [await connection.channel() for _ in range(3)]
    queue = await seam.queue(publisher)
    inboxes = Inbox(), Inbox()
    await first.consume(queue, inboxes[0].put)
    await second.consume(queue, inboxes[1].put)
    for _ in range(4):
        await publisher.publish(message(), "", queue)
    await seam.until(lambda: len(inboxes[0]) + len(inboxes[1]) == 4)
    assert (len(inboxes[0]), len(inboxes[1])) == (2, 2)


@bounded(LIMIT_S)
async def test_get_takes_one_message_or_none(seam: Seam) -> None:
    channel = await (await seam.connect()).channel()
    queue = await seam.queue(channel)
    assert await channel.get(queue) is None
    sent = message()
    await channel.publish(sent, "", queue)
    got = await channel.get(queue)
    assert got is not None and got.message_id == sent.message_id
    await channel.ack(got.delivery_tag)
    assert await channel.get(queue) is None


@bounded(LIMIT_S)
async def test_unroutable_publish_raises_and_the_channel_stays_open(seam: Seam) -> None:
    channel = await (await seam.connect()).channel()
    exchange = await seam.exchange(channel)
    queue = await seam.queue(channel)
    await channel.bind(queue, exchange, "a.*")
    with pytest.raises(UnroutableJob, match="unroutable"):
        await channel.publish(message(), exchange, "b.c")
    await channel.publish(message(), exchange, "a.b")
    lost = message()
    failed = await channel.publish_many(
        [(message(), exchange, "a.c"), (lost, exchange, "nowhere")], window=10
    )
    assert [(m.message_id, type(e)) for m, e in failed] == [(lost.message_id, UnroutableJob)]
    assert (await channel.inspect_queue(queue)).messages == 2
    assert channel.unconfirmed == 0


@bounded(LIMIT_S)
async def test_publishing_to_a_missing_exchange_closes_the_channel(seam: Seam) -> None:
    connection = await seam.connect()
    channel = await connection.channel()
    with pytest.raises(TopologyError, match="does not exist"):
        await channel.publish(message(), "bjtest.no-such-exchange", "x")
    await seam.until(lambda: channel.is_closed and channel.closing.done())
    with pytest.raises(PublishError):
        await channel.publish(message(), "", "x")
    with pytest.raises(ConnectionLost):
        await channel.get("x")
    assert not connection.is_closed


@bounded(LIMIT_S)
async def test_declares_are_idempotent_and_other_arguments_are_refused(seam: Seam) -> None:
    connection = await seam.connect()
    channel = await connection.channel()
    queue = await seam.queue(channel, {"x-message-ttl": 100})
    state = await channel.declare_queue(queue, {"x-message-ttl": 100})
    assert (state.name, state.messages, state.consumers) == (queue, 0, 0)
    with pytest.raises(TopologyMismatch, match="'x-message-ttl' differs"):
        await channel.declare_queue(queue, {"x-message-ttl": 200})
    await seam.until(lambda: channel.is_closed)
    channel = await connection.channel()
    exchange = await seam.exchange(channel)
    await channel.declare_exchange(exchange, "topic")
    with pytest.raises(TopologyMismatch, match="'type' differs"):
        await channel.declare_exchange(exchange, "direct")


@bounded(LIMIT_S)
async def test_inspect_and_delete(seam: Seam) -> None:
    connection = await seam.connect()
    channel = await connection.channel()
    with pytest.raises(TopologyError, match="does not exist"):
        await channel.inspect_queue("bjtest.no-such-queue")
    channel = await connection.channel()
    queue = await seam.queue(channel)
    await channel.publish(message(), "", queue)
    with pytest.raises(TopologyError):
        await channel.delete_queue(queue, if_empty=True)
    channel = await connection.channel()
    consuming = await connection.channel()
    tag = await consuming.consume(queue, Inbox().put)
    await seam.until(lambda: depth_is(channel, queue, 0))  # delivered, unacked
    assert (await channel.inspect_queue(queue)).consumers == 1
    with pytest.raises(TopologyError):
        await channel.delete_queue(queue, if_unused=True)
    channel = await connection.channel()
    await channel.delete_queue(queue)
    await seam.until(lambda: consuming.consumer_cancelled.done())
    assert consuming.consumer_cancelled.result() == tag
    with pytest.raises(TopologyError):
        await channel.inspect_queue(queue)
    channel = await connection.channel()
    await channel.delete_queue(queue)  # deleting a missing queue succeeds


@bounded(LIMIT_S)
async def test_a_private_queue_goes_with_its_connection(seam: Seam) -> None:
    owner = await seam.connect()
    channel = await owner.channel()
    exchange = await seam.exchange(channel)
    private = await channel.declare_private_queue()
    await channel.bind(private, exchange, "#")
    inbox = Inbox()
    await channel.consume(private, inbox.put, no_ack=True)
    await channel.publish(message(), exchange, "any.key")
    await seam.until(inbox.has(1))
    await owner.close()
    assert owner.is_closed and owner.lost.done()
    other = await (await seam.connect()).channel()
    with pytest.raises(TopologyError):
        await other.inspect_queue(private)


@bounded(LIMIT_S)
async def test_exchange_to_exchange_bindings_route(seam: Seam) -> None:
    channel = await (await seam.connect()).channel()
    source = await seam.exchange(channel)
    destination = await seam.exchange(channel)
    await channel.bind_exchange(destination, source, "a.*")
    queue = await seam.queue(channel)
    await channel.bind(queue, destination, "#")
    await channel.publish(message(), source, "a.b")
    with pytest.raises(UnroutableJob):
        await channel.publish(message(), source, "b.b")
    got = await channel.get(queue)
    assert got is not None and (got.exchange, got.routing_key) == (source, "a.b")


@bounded(LIMIT_S)
async def test_single_active_consumer_hands_over_when_its_connection_closes(seam: Seam) -> None:
    first = await seam.connect("first")
    second = await seam.connect("second")
    publisher = await (await seam.connect("publisher")).channel()
    queue = await seam.queue(publisher, {"x-single-active-consumer": True})
    inboxes = Inbox(), Inbox()
    await (await first.channel()).consume(queue, inboxes[0].put)
    await (await second.channel()).consume(queue, inboxes[1].put)
    sent = message()
    await publisher.publish(sent, "", queue)
    await seam.until(inboxes[0].has(1))
    assert len(inboxes[1]) == 0 and (await publisher.inspect_queue(queue)).consumers == 2
    await first.close()
    await seam.until(inboxes[1].has(1))
    assert (inboxes[1][0].message_id, inboxes[1][0].redelivered) == (sent.message_id, True)
    await publisher.publish(message(), "", queue)
    await seam.until(inboxes[1].has(2))


@bounded(LIMIT_S)
async def test_a_lost_connection_requeues_unacked_and_fails_later_operations(seam: Seam) -> None:
    connection = await seam.connect()
    channel = await connection.channel()
    queue = await seam.queue(channel)
    inbox = Inbox()
    await channel.consume(queue, inbox.put)
    sent = [message(), message()]
    for one in sent:
        await channel.publish(one, "", queue)
    await seam.until(inbox.has(2))
    await channel.ack(inbox[0].delivery_tag)
    await channel.flush_acks()
    await channel.inspect_queue(queue)  # a round trip after the ack: the broker has it
    seam.drop()
    await seam.until(lambda: connection.lost.done() and channel.closing.done())
    assert connection.is_closed and channel.is_closed
    with pytest.raises(ConnectionLost):
        await channel.ack(inbox[1].delivery_tag)
    with pytest.raises(ConnectionLost):
        await connection.channel()
    fresh = await (await seam.connect("after")).channel()
    again = await fresh.get(queue)
    assert again is not None and (again.message_id, again.redelivered) == (sent[1].message_id, True)
    assert await fresh.get(queue) is None


@bounded(LIMIT_S)
async def test_an_unknown_delivery_tag_closes_the_channel(seam: Seam) -> None:
    connection = await seam.connect()
    channel = await connection.channel()
    queue = await seam.queue(channel)
    await channel.publish(message(), "", queue)
    delivery = await channel.get(queue)
    assert delivery is not None
    await channel.ack(delivery.delivery_tag + 1000)
    await channel.flush_acks()
    await seam.until(lambda: channel.closing.done())
    with pytest.raises(ConnectionLost):
        await channel.get(queue)
    probe = await connection.channel()
    assert (await probe.inspect_queue(queue)).messages == 1  # the unacked one came back


@bounded(LIMIT_S)
async def test_no_ack_consumers_take_messages_for_good(seam: Seam) -> None:
    connection = await seam.connect()
    channel = await connection.channel(prefetch=1)
    queue = await seam.queue(channel)
    inbox = Inbox()
    tag = await channel.consume(queue, inbox.put, no_ack=True)
    for _ in range(3):
        await channel.publish(message(), "", queue)
    await seam.until(inbox.has(3))  # prefetch does not apply without acks
    await channel.cancel(tag)
    await channel.close()
    probe = await connection.channel()
    assert (await probe.inspect_queue(queue)).messages == 0
