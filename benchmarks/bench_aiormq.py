"""The ceiling: the raw aio-pika side's work on aiormq directly (the protocol layer under
aio-pika), with nothing of aio-pika's own per-message objects.

Publishing: a confirm channel, ``basic_publish`` of persistent messages (content type, message
id) with ``mandatory=True``, pipelined with ``asyncio.gather`` over windows of ``window``; each
confirm checked. Consuming: ``basic_consume`` with manual acks; aiormq runs each delivery's
callback as a task; the callback ``json.loads`` the body, calls the handler, then
``basic_ack``s the delivery tag. No brokerjobs, pydantic or aio-pika import in this module.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from bench_common import (
    CONTENT_TYPE,
    JOB_NAME,
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

Handler = Callable[[dict[str, Any]], Awaitable[None]]


async def publish_one(channel: AbstractChannel, exchange: str, fields: dict[str, Any]) -> None:
    properties = Basic.Properties(
        delivery_mode=2, content_type=CONTENT_TYPE, message_id=uuid.uuid4().hex
    )
    confirmation = await channel.basic_publish(
        encode_fields(fields),
        exchange=exchange,
        routing_key=JOB_NAME,
        properties=properties,
        mandatory=True,
    )
    if not isinstance(confirmation, Basic.Ack):
        raise RuntimeError(f"publish not confirmed: {confirmation!r}")


async def publish_batch(
    channel: AbstractChannel, exchange: str, jobs: list[dict[str, Any]], window: int
) -> None:
    for start in range(0, len(jobs), window):
        chunk = jobs[start : start + window]
        await asyncio.gather(*(publish_one(channel, exchange, fields) for fields in chunk))


async def _consume(cfg: ChildConfig, handler: Handler, acked: Countdown) -> AbstractConnection:
    """Start a consumer whose callback decodes, runs ``handler``, then acks (``acked`` counts
    acks written to the socket: a run waits for them before closing)."""

    async def on_message(message: DeliveredMessage) -> None:
        await handler(json.loads(message.body))
        assert message.delivery_tag is not None
        await message.channel.basic_ack(message.delivery_tag)
        acked.tick()

    connection = await aiormq.connect(cfg.url)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=cfg.prefetch)
    await channel.basic_consume(cfg.queue, on_message, no_ack=False)
    return connection


async def publish(cfg: ChildConfig) -> Result:
    jobs = [job_fields(i) for i in range(cfg.jobs)]
    connection = await aiormq.connect(cfg.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        start = Stamp.take(cfg.broker_pid)
        await publish_batch(channel, cfg.exchange, jobs, cfg.window)
        end = Stamp.take(cfg.broker_pid)
    return throughput(start, end, cfg.jobs)


async def consume(cfg: ChildConfig) -> Result:
    import_rss = peak_rss_mb()
    countdown = Countdown(cfg.jobs, cfg.broker_pid)

    async def handler(_: dict[str, Any]) -> None:
        countdown.tick()

    acked = Countdown(cfg.jobs)
    start = Stamp.take(cfg.broker_pid)
    connection = await _consume(cfg, handler, acked)
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
    consumer = await _consume(cfg, handler, acked)
    publisher = await aiormq.connect(cfg.url)
    async with consumer, publisher, asyncio.timeout(cfg.timeout):
        channel = await publisher.channel(publisher_confirms=True)

        async def send(index: int) -> None:
            await publish_one(channel, cfg.exchange, job_fields(index, sent_at=time.time()))

        start = Stamp.take(0)  # no broker CPU: paced, the broker's time is mostly idle/others'
        await paced(cfg.jobs, cfg.rate, send)
        await countdown.done.wait()
        await acked.done.wait()
    return countdown.latency() | cpu_per_job(start, countdown.ended, cfg.jobs)


TASKS: dict[str, Callable[[ChildConfig], Awaitable[Result]]] = {
    "publish": publish,
    "consume": consume,
    "latency": latency,
}
