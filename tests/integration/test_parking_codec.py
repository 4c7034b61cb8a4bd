"""Through the real broker: frames pamqp cannot decode arrive, and a message's every property
and header type survives parking, export, purge, import and replay."""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile
from pathlib import Path

import aiormq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brokerjobs import amqp_types as at
from brokerjobs import amqp_values as av
from brokerjobs.broker.amqp import connect
from brokerjobs.broker.base import BrokerChannel
from brokerjobs.envelope import Delivery, OutgoingMessage, copy_of
from brokerjobs.errors import PublishError
from brokerjobs.parking import ParkingLot
from brokerjobs.topology import parking_queue_name
from tests.support.amqp_strategies import messages
from tests.support.broker import TEST_URL, Broker, make_settings, unique
from tests.support.codec_checks import canonical_table, differences, park_copy, wire_of

# Bounded for CI; a long run, e.g. BJ_ROUNDTRIP_EXAMPLES=600 BJ_ROUNDTRIP_BATCH=40 with -s:
# BJ_ROUNDTRIP_REPORT=1 prints the running count of messages and differences.
EXAMPLES = int(os.environ.get("BJ_ROUNDTRIP_EXAMPLES", "20"))
BATCH = int(os.environ.get("BJ_ROUNDTRIP_BATCH", "25"))
MIN_BATCH = int(os.environ.get("BJ_ROUNDTRIP_MIN_BATCH", "1"))
REPORT = bool(os.environ.get("BJ_ROUNDTRIP_REPORT"))
_totals = {"messages": 0, "differences": 0}


class RawProperties:
    """A hand-built property list, as aiormq publishes a properties object: marshal() only."""

    def __init__(self, blob: bytes, message_id: str) -> None:
        self.blob, self.message_id = blob, message_id

    def marshal(self) -> bytes:
        return self.blob


def shortstr(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def table(*fields: tuple[bytes, bytes]) -> bytes:
    body = b"".join(shortstr(key) + value for key, value in fields)
    return struct.pack(">I", len(body)) + body


def nested(depth: int) -> bytes:
    value = b"V"
    for _ in range(depth):
        value = b"A" + struct.pack(">I", len(value)) + value
    return value


HEADERS, MESSAGE_ID, TIMESTAMP, TYPE = 0x2000, 0x0080, 0x0040, 0x0020
EVERY_TYPE = table(
    (b"t", b"t\x01"), (b"b", b"b\xff"), (b"B", b"B\xff"), (b"s", b"s\xff\xfe"),
    (b"u", b"u\xff\xfe"), (b"I", b"I\xff\xff\xff\xfe"), (b"i", b"i\xff\xff\xff\xfe"),
    (b"l", b"l" + b"\xff" * 8), (b"L", b"L" + b"\x7f" + b"\xff" * 7),
    (b"f", b"f" + struct.pack(">f", 0.1)), (b"d", b"d" + struct.pack(">d", 0.1)),
    (b"D", b"D\x02" + struct.pack(">i", -5)), (b"S", b"S\x00\x00\x00\x02\xff\xfe"),
    (b"x", b"x\x00\x00\x00\x01\x00"), (b"T", b"T" + struct.pack(">Q", (1 << 64) - 1)),
    (b"V", b"V"), (b"A", b"A\x00\x00\x00\x02b\x01"), (b"F", b"F" + table((b"k", b"V"))),
)  # fmt: skip
RAW_CASES = {
    "microseconds": struct.pack(">HQ", TIMESTAMP, 1_700_000_000_000_000),
    "nanoseconds": struct.pack(">HQ", TIMESTAMP, 1_700_000_000_000_000_000),
    "negative": struct.pack(">HQ", TIMESTAMP, (1 << 64) - 1),
    "not-utf8-id": struct.pack(">H", MESSAGE_ID | TYPE) + shortstr(b"\xff\xfe") + shortstr(b"\xe9"),
    "every-type": struct.pack(">H", HEADERS) + EVERY_TYPE,
    "too-deep": struct.pack(">H", HEADERS) + table((b"deep", nested(av.MAX_DEPTH + 50))),
}


async def test_frames_pamqp_cannot_decode_reach_a_consumer_and_the_connection_stays(
    broker: Broker,
) -> None:
    queue = unique("raw")
    broker.track_queue(queue)
    channel = await broker.fresh_channel()
    await channel.declare_queue(queue, {})
    await publish_raw(queue, [*RAW_CASES.items(), ("good", struct.pack(">H", 0))])

    got: dict[bytes, Delivery] = {}
    all_in = asyncio.Event()

    async def on_delivery(delivery: Delivery) -> None:
        got[delivery.body] = delivery
        await channel.ack(delivery.delivery_tag)
        if len(got) == len(RAW_CASES) + 1:
            all_in.set()

    await channel.consume(queue, on_delivery)
    await asyncio.wait_for(all_in.wait(), 10)
    assert not broker.connection.is_closed and not channel.is_closed
    assert got[b"microseconds"].timestamp == at.Timestamp(1_700_000_000_000_000)
    assert got[b"nanoseconds"].timestamp == at.Timestamp(1_700_000_000_000_000_000)
    assert got[b"negative"].timestamp == at.Timestamp((1 << 64) - 1)
    odd = got[b"not-utf8-id"]
    assert (odd.message_id or "").encode("utf-8", "surrogateescape") == b"\xff\xfe"
    every_type = got[b"every-type"].headers
    assert canonical_table(every_type) == canonical_table(av.decode_table(EVERY_TYPE))
    if broker.connection.server_version < (4, 0):  # 4.x re-encodes tables (canonical_table)
        assert av.encode_table(every_type) == EVERY_TYPE  # byte for byte
    degraded = got[b"too-deep"].headers
    assert degraded == {av.RAW_PROPERTIES: RAW_CASES["too-deep"]}  # kept, not lost


async def publish_raw(queue: str, cases: list[tuple[str, bytes]]) -> None:
    """Each case's name as the body, its bytes as the content header's property list."""
    raw = await aiormq.connect(TEST_URL)
    try:
        raw_channel = await raw.channel()
        for name, blob in cases:
            # Duck-typed: aiormq only reads message_id and calls marshal().
            properties = RawProperties(blob, name)
            await raw_channel.basic_publish(
                name.encode(),
                routing_key=queue,
                properties=properties,  # type: ignore[arg-type]
            )
    finally:
        await raw.close()


async def test_the_broker_refuses_another_user_id_so_copies_carry_it_in_a_header(
    broker: Broker,
) -> None:
    queue = unique("user")
    broker.track_queue(queue)
    channel = await broker.fresh_channel()
    await channel.declare_queue(queue, {})
    with pytest.raises(PublishError):  # 406 PRECONDITION_FAILED: user_id is not "guest"
        await channel.publish(OutgoingMessage(b"", "a", None, None, {}, user_id="alice"), "", queue)
    channel = await broker.fresh_channel()
    own = OutgoingMessage(b"", "b", None, None, {}, user_id="guest", expiration_ms=600_000)
    await channel.publish(own, "", queue)
    [delivered] = await broker.drain(queue)
    assert (delivered.user_id, delivered.expiration) == ("guest", "600000")
    copy = copy_of(delivered, dict(delivered.headers))
    assert (copy.user_id, copy.expiration_ms) == (None, None)
    assert copy.headers == {"bj-original-user-id": "guest", "bj-original-expiration": "600000"}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(st.lists(messages(), min_size=MIN_BATCH, max_size=BATCH, unique_by=lambda m: m.message_id))
def test_original_parked_exported_imported_and_replayed_are_the_same_message(
    originals: list[OutgoingMessage],
) -> None:
    problems = asyncio.run(round_trip(originals))
    _totals["messages"] += len(originals)
    _totals["differences"] += len(problems)
    if REPORT:
        print(f"round trip: {_totals['messages']} messages, {_totals['differences']} differences")
    assert problems == []


async def round_trip(originals: list[OutgoingMessage]) -> list[str]:
    """Every difference between the stages of the path, beyond the documented headers."""
    queue = unique("codec")
    connection = await connect(make_settings(), "tests")
    try:
        channel = await connection.channel(confirms=True)
        for name in (queue, parking_queue_name(queue)):
            await channel.declare_queue(name, {})
        assert not await channel.publish_many(((m, "", queue) for m in originals), 500)
        delivered = await _take(channel, queue, len(originals))
        parked = [park_copy(d, queue) for d in delivered]
        assert not await channel.publish_many(
            ((m, "", parking_queue_name(queue)) for m in parked), 500
        )
        with tempfile.TemporaryDirectory() as folder:
            stages = await _park_export_import_replay(queue, Path(folder) / "x.jsonl")
        replayed = await _take(channel, queue, len(originals))
        stages["replayed"] = {d.message_id or "": d for d in replayed}  # as ParkedJob.job_id
        return _compare(originals, delivered, stages)
    finally:
        channel = await connection.channel(confirms=False)
        for name in (queue, parking_queue_name(queue)):
            await channel.delete_queue(name)
        await connection.close()


async def _park_export_import_replay(queue: str, path: Path) -> dict[str, dict[str, Delivery]]:
    async with ParkingLot(make_settings(), queue) as lot:
        parked = {j.job_id: j.delivery for j in (await lot.list()).jobs}
        summary = (await lot.export(path)).summary
        assert (await lot.purge(expect=summary)).purged == len(parked)
        report = await lot.import_(path)
        assert not report.failed and not report.skipped, report
        imported = {j.job_id: j.delivery for j in (await lot.list()).jobs}
        replay = await lot.replay()
        assert replay.replayed == len(parked) and not replay.failed, replay.failed
    return {"parked": parked, "imported": imported}


async def _take(channel: BrokerChannel, queue: str, count: int) -> list[Delivery]:
    taken: list[Delivery] = []
    while len(taken) < count:
        delivery = await channel.get(queue)
        assert delivery is not None, f"only {len(taken)} of {count} in {queue}"
        await channel.ack(delivery.delivery_tag)
        taken.append(delivery)
    return taken


def _compare(
    originals: list[OutgoingMessage],
    delivered: list[Delivery],
    stages: dict[str, dict[str, Delivery]],
) -> list[str]:
    problems = []
    for original, first in zip(originals, delivered, strict=True):
        job = original.message_id
        problems += [f"{job} delivered {p}" for p in differences(original, first, moved=False)]
        parked = stages["parked"][job]
        problems += [f"{job} parked {p}" for p in differences(first, parked, moved=True)]
        if wire_of(stages["imported"][job]) != wire_of(parked):
            problems.append(f"{job} imported differs from parked")
        replayed = stages["replayed"][job]
        problems += [f"{job} replayed {p}" for p in differences(parked, replayed, moved=False)]
        problems += [f"{job} replayed vs original {p}" for p in differences(first, replayed, True)]
    return problems
