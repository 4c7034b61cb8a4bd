"""The baseline: plain aio-pika doing the same work as brokerjobs, as well as aio-pika allows.

Publishing: a confirm channel, persistent messages, ``mandatory=True``, pipelined with
``asyncio.gather`` over windows of ``window`` outstanding publishes (measured faster here than a
semaphore-bounded sliding window or one gather over all jobs); each confirm is checked.
Consuming: ``queue.consume(callback)``; the callback ``json.loads`` the body, calls the handler,
then ``await message.ack()`` (bench_typed.py: the same callback validating the body into the
benchmark's pydantic model instead).
Replaying (the naive move loop): consume the parking queue with a big prefetch; the callback
republishes the message (body, properties and headers as they are) to the main queue through
the default exchange on a confirm channel, and acks it once confirmed. Pipelined: aiormq runs
each delivery's callback as its own task, so up to ``REPLAY_PREFETCH`` moves are in flight.
No brokerjobs or pydantic import in this module.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractExchange, AbstractIncomingMessage
from bench_common import (
    CONTENT_TYPE,
    JOB_NAME,
    PARKING_SUFFIX,
    ChildConfig,
    Countdown,
    Result,
    Stamp,
    cpu_per_job,
    encode_fields,
    job_fields,
    paced,
    peak_rss_mb,
    throughput,
)
from pamqp.commands import Basic

T = TypeVar("T")
Decode = Callable[[bytes], T]  # the body -> what the handler takes (json.loads here)
REPLAY_PREFETCH = 1000  # moves in flight ("a big prefetch"); 200 to 3000 measured within noise


def make_message(fields: dict[str, Any]) -> aio_pika.Message:
    return aio_pika.Message(
        encode_fields(fields),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type=CONTENT_TYPE,
        message_id=uuid.uuid4().hex,
    )


async def publish_one(exchange: AbstractExchange, fields: dict[str, Any]) -> None:
    confirmation = await exchange.publish(make_message(fields), JOB_NAME, mandatory=True)
    if not isinstance(confirmation, Basic.Ack):
        raise RuntimeError(f"publish not confirmed: {confirmation!r}")


async def publish_batch(
    exchange: AbstractExchange, jobs: list[dict[str, Any]], window: int
) -> None:
    for start in range(0, len(jobs), window):
        chunk = jobs[start : start + window]
        await asyncio.gather(*(publish_one(exchange, fields) for fields in chunk))


async def _open(cfg: ChildConfig) -> tuple[AbstractConnection, AbstractExchange]:
    connection = await aio_pika.connect(cfg.url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(cfg.exchange, ensure=True)
    return connection, exchange


async def _consume(
    cfg: ChildConfig,
    handler: Callable[[T], Awaitable[None]],
    acked: Countdown,
    decode: Decode[T],
) -> AbstractConnection:
    """Start a consumer whose callback decodes, runs ``handler``, then acks.

    ``acked`` counts sent acks: closing the connection discards acks still queued in aiormq, so
    a run waits for it (after its timed section) before closing.
    """

    async def on_message(message: AbstractIncomingMessage) -> None:
        await handler(decode(message.body))
        await message.ack()
        acked.tick()

    connection = await aio_pika.connect(cfg.url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=cfg.prefetch)
    queue = await channel.get_queue(cfg.queue, ensure=True)
    await queue.consume(on_message)
    return connection


async def publish(cfg: ChildConfig) -> Result:
    jobs = [job_fields(i) for i in range(cfg.jobs)]
    connection, exchange = await _open(cfg)
    async with connection:
        start = Stamp.take(cfg.broker_pid)
        await publish_batch(exchange, jobs, cfg.window)
        end = Stamp.take(cfg.broker_pid)
    return throughput(start, end, cfg.jobs)


async def consume(cfg: ChildConfig) -> Result:
    return await consume_decoded(cfg, json.loads)


async def consume_decoded(cfg: ChildConfig, decode: Decode[T]) -> Result:
    """The consume task with ``decode`` in the callback (bench_typed: a pydantic model's)."""
    import_rss = peak_rss_mb()
    countdown = Countdown(cfg.jobs, cfg.broker_pid)

    async def handler(_: T) -> None:
        countdown.tick()

    acked = Countdown(cfg.jobs)
    start = Stamp.take(cfg.broker_pid)
    connection = await _consume(cfg, handler, acked, decode)
    async with connection, asyncio.timeout(cfg.timeout):
        await countdown.done.wait()
        await acked.done.wait()
    rss = {"rss_mb": peak_rss_mb(), "import_rss_mb": import_rss}
    return countdown.throughput(start) | rss


async def latency(cfg: ChildConfig) -> Result:
    countdown = Countdown(cfg.jobs)

    async def handler(data: dict[str, Any]) -> None:
        countdown.tick(sent_at=data["sent_at"])

    acked = Countdown(cfg.jobs)
    consumer = await _consume(cfg, handler, acked, json.loads)
    publisher, exchange = await _open(cfg)

    async def send(index: int) -> None:
        await publish_one(exchange, job_fields(index, sent_at=time.time()))

    async with consumer, publisher, asyncio.timeout(cfg.timeout):
        start = Stamp.take(0)  # no broker CPU: paced, the broker's time is mostly idle/others'
        await paced(cfg.jobs, cfg.rate, send)
        await countdown.done.wait()
        await acked.done.wait()
    return countdown.latency() | cpu_per_job(start, countdown.ended, cfg.jobs)


def _moved_copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    return aio_pika.Message(
        message.body,
        headers=message.headers,
        content_type=message.content_type,
        message_id=message.message_id,
        type=message.type,
        priority=message.priority,
        timestamp=message.timestamp,
        correlation_id=message.correlation_id,
        app_id=message.app_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def replay(cfg: ChildConfig) -> Result:
    moved = Countdown(cfg.jobs)
    start = Stamp.take(0)
    connection = await aio_pika.connect(cfg.url)
    async with connection, asyncio.timeout(cfg.timeout):
        reader = await connection.channel()
        await reader.set_qos(prefetch_count=REPLAY_PREFETCH)
        writer = await connection.channel(publisher_confirms=True)
        main = writer.default_exchange

        async def move(message: AbstractIncomingMessage) -> None:
            confirmation = await main.publish(_moved_copy(message), cfg.queue, mandatory=True)
            if not isinstance(confirmation, Basic.Ack):
                raise RuntimeError(f"move not confirmed: {confirmation!r}")
            await message.ack()
            moved.tick()

        parked = await reader.get_queue(cfg.queue + PARKING_SUFFIX, ensure=False)
        await parked.consume(move)
        await moved.done.wait()
        await reader.close()  # flushes the acks
        await writer.close()
        end = Stamp.take(0)
    return throughput(start, end, cfg.jobs)


TASKS: dict[str, Callable[[ChildConfig], Awaitable[Result]]] = {
    "publish": publish,
    "consume": consume,
    "latency": latency,
    "replay": replay,
}
