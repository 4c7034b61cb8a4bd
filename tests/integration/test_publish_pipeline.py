"""Through the real broker: pipelined publishing (the outbox, and aiormq's basic_publish where
the outbox is off) confirms, returns and nacks each message as its own, whatever the batching."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from brokerjobs.broker.amqp import Channel
from brokerjobs.envelope import OutgoingMessage, new_job_id
from brokerjobs.errors import (
    PublishInterrupted,
    PublishNacked,
    TopologyError,
    UnencodableMessage,
    UnroutableJob,
)
from tests.support.broker import Broker, unique

LIMIT_S = 30.0


def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        async with asyncio.timeout(LIMIT_S):
            await test(*args, **kwargs)

    return run


def message(body: bytes = b"{}") -> OutgoingMessage:
    return OutgoingMessage(body, new_job_id(), "pipeline.job", None, {"bj-attempt": 1})


@pytest.fixture(params=["outbox", "basic_publish"])
async def channel(request: pytest.FixtureRequest, broker: Broker) -> Channel:
    channel = await broker.connection.channel(confirms=True)
    if request.param == "basic_publish":
        channel._outbox = None  # as on an aiormq without what the outbox needs
    else:
        assert channel._outbox is not None
    return channel


async def queue_on(broker: Broker, channel: Channel, arguments: dict[str, object]) -> str:
    queue = unique("pipe")
    broker.track_queue(queue)
    await channel.declare_queue(queue, arguments)
    return queue


@bounded
async def test_a_batch_larger_than_its_window_is_confirmed_and_stored_in_order(
    broker: Broker, channel: Channel
) -> None:
    queue = await queue_on(broker, channel, {})
    sent = [message(f'{{"n": {n}}}'.encode()) for n in range(60)]
    failed = await channel.publish_many([(m, "", queue) for m in sent], window=7)
    assert failed == []
    assert channel.unconfirmed == 0
    stored = await broker.drain(queue)
    assert [(d.message_id, d.body) for d in stored] == [(m.message_id, m.body) for m in sent]
    assert all(d.headers == {"bj-attempt": 1} and d.persistent for d in stored)


@bounded
async def test_unroutable_messages_in_a_batch_fail_alone(broker: Broker, channel: Channel) -> None:
    exchange = unique("pipe-x")
    queue = await queue_on(broker, channel, {})
    await channel.declare_exchange(exchange, "topic")
    try:
        await channel.bind(queue, exchange, "a.#")
        routed = [(message(), exchange, "a.one" if n % 3 else "b.none") for n in range(30)]
        failed = await channel.publish_many(routed, window=1000)
        lost = {m.message_id for m, _, key in routed if key == "b.none"}
        assert {m.message_id for m, _ in failed} == lost
        assert all(isinstance(error, UnroutableJob) for _, error in failed)
        assert len(await broker.drain(queue)) == 30 - len(lost)
    finally:
        await (await broker.fresh_channel()).delete_exchange(exchange)


@bounded
async def test_nacked_messages_fail_alone_in_a_batch_and_alone(
    broker: Broker, channel: Channel
) -> None:
    queue = await queue_on(broker, channel, {"x-max-length": 2, "x-overflow": "reject-publish"})
    batch = [message() for _ in range(5)]
    failed = await channel.publish_many([(m, "", queue) for m in batch], window=1000)
    assert [m.message_id for m, _ in failed] == [m.message_id for m in batch[2:]]
    assert all(isinstance(error, PublishNacked) for _, error in failed)
    with pytest.raises(PublishNacked):
        await channel.publish(message(), "", queue)
    assert [d.message_id for d in await broker.drain(queue)] == [m.message_id for m in batch[:2]]


@bounded
async def test_bodies_larger_than_a_frame_and_empty_ones_arrive_whole(
    broker: Broker, channel: Channel
) -> None:
    queue = await queue_on(broker, channel, {})
    big = bytes(range(256)) * 1600  # 409,600 bytes: several frames of 131,072
    bodies = [big, b"", b"x", big[:131_064], big[:131_065]]
    failed = await channel.publish_many([(message(b), "", queue) for b in bodies], window=2)
    assert failed == []
    assert [d.body for d in await broker.drain(queue)] == bodies


@bounded
async def test_concurrent_publishes_are_each_confirmed(broker: Broker, channel: Channel) -> None:
    queue = await queue_on(broker, channel, {})
    sent = [message() for _ in range(200)]
    await asyncio.gather(*(channel.publish(m, "", queue) for m in sent))
    assert channel.unconfirmed == 0
    stored = {d.message_id for d in await broker.drain(queue)}
    assert stored == {m.message_id for m in sent}


@bounded
async def test_a_missing_exchange_is_a_topology_error(broker: Broker, channel: Channel) -> None:
    routed = [(message(), unique("pipe-nowhere"), "a") for _ in range(3)]
    with pytest.raises(TopologyError, match="does not exist"):
        await channel.publish_many(routed, window=1000)


@bounded
async def test_a_routing_key_over_255_bytes_is_refused_before_sending(
    broker: Broker, channel: Channel
) -> None:
    queue = await queue_on(broker, channel, {})
    with pytest.raises((UnencodableMessage, ValueError)):
        await channel.publish(message(), "", "k" * 256)
    await channel.publish(message(), "", queue)  # the channel is still fine
    assert len(await broker.drain(queue)) == 1


@bounded
async def test_publishes_waiting_when_the_channel_closes_are_interrupted(
    broker: Broker, channel: Channel
) -> None:
    queue = await queue_on(broker, channel, {})
    sent = [message() for _ in range(300)]
    batch = asyncio.ensure_future(channel.publish_many([(m, "", queue) for m in sent], 1000))
    alone = asyncio.ensure_future(channel.publish(message(), "", queue))
    await asyncio.sleep(0)  # a scheduling yield, not a wait: both tasks submit their frames
    await channel.close()
    failed = await batch
    assert all(isinstance(error, PublishInterrupted) for _, error in failed)
    with contextlib.suppress(PublishInterrupted):
        await alone
    assert channel.unconfirmed == 0
    stored = {d.message_id for d in await broker.drain(queue)}
    assert {m.message_id for m, _ in failed} | stored >= {m.message_id for m in sent}
