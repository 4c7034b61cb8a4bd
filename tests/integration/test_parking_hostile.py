"""The replay tool on parked messages a hostile or careless producer (or the broker's own
dead-lettering) leaves: no message id, a shared id, control characters in ids and headers, a
payload nested past the recursion limit."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiormq

from brokerjobs import App
from brokerjobs.envelope import OutgoingMessage
from brokerjobs.parking import ParkingLot
from brokerjobs.provision import declare
from tests.support import raw_amqp as raw
from tests.support.broker import TEST_URL, Broker, make_settings, unique, wait_for

REPO = Path(__file__).resolve().parents[2]
MESSAGE_ID, TYPE, HEADERS = 0x0080, 0x0020, 0x2000


class Blob:
    """A property list exactly as given (aiormq reads message_id and calls marshal())."""

    def __init__(self, blob: bytes) -> None:
        self.blob, self.message_id = blob, None

    def marshal(self) -> bytes:
        return self.blob


def properties(message_id: bytes | None, headers: bytes | None = None) -> Blob:
    flags = TYPE | (MESSAGE_ID if message_id is not None else 0) | (HEADERS if headers else 0)
    parts = [headers or b"", raw.shortstr(message_id or b""), raw.shortstr(b"x.job")]
    if message_id is None:
        parts.pop(1)
    return Blob(flags.to_bytes(2, "big") + b"".join(parts))


async def parked_queue(broker: Broker, messages: list[tuple[bytes, Blob]]) -> str:
    """A declared app's main queue, with ``messages`` (body, properties) in its parking queue."""
    app = App(unique("hostile"))
    queue = app.queue(f"{app.name}.q", "x.*").name
    broker.track(app)
    await declare(broker.connection, app.topology())
    await park_raw(broker, queue, messages)
    return queue


async def park_raw(broker: Broker, queue: str, messages: list[tuple[bytes, Blob]]) -> None:
    connection = await aiormq.connect(TEST_URL)
    try:
        channel = await connection.channel()
        await channel.confirm_delivery()
        for body, props in messages:
            await channel.basic_publish(body, routing_key=f"{queue}.parked", properties=props)  # type: ignore[arg-type]
    finally:
        await connection.close()
    await wait_for(lambda: broker.depth_is(f"{queue}.parked", len(messages)))


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "brokerjobs.cli", "parked", *args],
        capture_output=True,
        env={**os.environ, "BROKERJOBS_URL": TEST_URL},
        cwd=REPO,
        timeout=60,
        check=False,
    )


async def test_replay_sends_back_every_job_without_an_id_or_with_a_shared_one(
    broker: Broker,
) -> None:
    # As the broker dead-letters a job published without an id; and one job parked twice.
    messages = [(b"%d" % n, properties(None)) for n in range(3)]
    messages += [(b"%d" % n, properties(b"same")) for n in range(3, 5)]
    queue = await parked_queue(broker, messages)
    async with ParkingLot(make_settings(), queue) as lot:
        report = await lot.replay()
    assert (report.replayed, report.kept, report.failed) == (5, 0, [])
    replayed = await broker.drain(queue)
    assert sorted(d.body for d in replayed) == sorted(body for body, _ in messages)
    assert await broker.depth(f"{queue}.parked") == 0


async def test_replay_sends_back_jobs_sharing_an_id_whatever_their_replay_counts(
    broker: Broker,
) -> None:
    # One job duplicated by a crash, one copy of it replayed (and parked again) before.
    replayed_once = raw.table([("bj-replays", raw.field_int64(1))])
    messages = [(b"first", properties(b"same")), (b"second", properties(b"same", replayed_once))]
    queue = await parked_queue(broker, messages)
    async with ParkingLot(make_settings(), queue) as lot:
        report = await lot.replay()
    assert (report.replayed, report.kept, report.failed) == (2, 0, [])
    assert sorted(d.body for d in await broker.drain(queue)) == [b"first", b"second"]


async def test_import_skips_as_many_records_of_an_id_as_are_parked_and_no_more(
    broker: Broker, tmp_path: Path
) -> None:
    # Two jobs sharing an id, one without: exported, the queue keeps them all, one goes.
    one, two, no_id = (
        (b"one", properties(b"same")),
        (b"two", properties(b"same")),
        (b"no id", properties(None)),
    )
    queue = await parked_queue(broker, [one, two, no_id])
    path = tmp_path / "parked.jsonl"
    async with ParkingLot(make_settings(), queue) as lot:
        await lot.export(path)
        again = await lot.import_(path)  # nothing was purged: every record is still parked
        assert again.published == [] and len(again.skipped) == 3
        kept = await broker.drain(f"{queue}.parked")
        assert sorted(d.body for d in kept) == [b"no id", b"one", b"two"]
        await park_raw(broker, queue, [one, no_id])
        refill = await lot.import_(path)  # as after an import that stopped after two records
    assert len(refill.published) == 1 and len(refill.skipped) == 2
    assert sorted(d.body for d in await broker.drain(f"{queue}.parked")) == [
        b"no id",
        b"one",
        b"two",
    ]


async def test_importing_a_record_without_an_id_twice_parks_it_once(
    broker: Broker, tmp_path: Path
) -> None:
    queue = await parked_queue(broker, [(b"no id", properties(None)), (b"id", properties(b"a"))])
    path = tmp_path / "parked.jsonl"
    async with ParkingLot(make_settings(), queue) as lot:
        exported = await lot.export(path)
        assert (await lot.purge(expect=exported.summary)).purged == 2
        first = await lot.import_(path)
        again = await lot.import_(path)  # as after an import that failed midway
    assert len(first.published) == 2 and not first.skipped
    assert again.published == [] and sorted(again.skipped) == sorted(first.published)
    assert sorted(d.body for d in await broker.drain(f"{queue}.parked")) == [b"id", b"no id"]


async def test_show_prints_a_payload_nested_past_the_recursion_limit_as_not_json(
    broker: Broker,
) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000  # what a worker parks as "nested deeper than 64"
    queue = await parked_queue(broker, [(deep, properties(b"deep"))])
    for extra in ((), ("--json",)):
        shown = await asyncio.to_thread(cli, "show", queue, "deep", *extra)
        assert shown.returncode == 0, shown.stderr.decode()[-2000:]
        assert b"Traceback" not in shown.stderr
    assert b"nested deeper than 64" in shown.stdout or b"[[[" in shown.stdout
    human = await asyncio.to_thread(cli, "show", queue, "deep")
    assert b"(JSON nested deeper than 64 levels" in human.stdout


async def test_list_show_and_replay_print_producer_text_with_control_characters_escaped(
    broker: Broker,
) -> None:
    hostile = b"id\n\x1b[2J\x1b]0;owned\x07"
    headers = raw.table([("bj-park-reason", raw.field_longstr("\x1b[31mred\x9b\u202e".encode()))])
    queue = await parked_queue(broker, [(b"{}", properties(hostile, headers))])
    listed = await asyncio.to_thread(cli, "list", queue)
    shown = await asyncio.to_thread(cli, "show", queue, hostile.decode())
    as_json = await asyncio.to_thread(cli, "list", queue, "--json")
    for result in (listed, shown, as_json):
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert not set(result.stdout) & {0x1B, 0x07, 0x9B}, result.stdout
        assert "\u202e" not in result.stdout.decode()
    assert b"id\\n\\x1b[2J\\x1b]0;owned\\x07" in listed.stdout
    assert listed.stdout.count(b"\n") == 3  # the header, one row, the count line
    assert b"\\x1b[31mred\\x9b\\u202e" in shown.stdout
    assert json.loads(as_json.stdout)["id"] == hostile.decode()  # JSON keeps it exactly


async def test_a_producers_parked_at_header_never_breaks_a_listing_a_filter_or_show(
    broker: Broker,
) -> None:
    # A broker's dead letter keeps the producer's headers, bj-parked-at included.
    times = {
        b"naive": raw.field_longstr(b"2026-01-01T00:00:00"),
        b"not-utf8": raw.field_bytes(b"\xff\xfe"),
        b"year-1": raw.field_longstr(b"0001-01-01T00:00:00+14:00"),
        b"year-9999": raw.field_longstr(b"9999-12-31T23:59:59-14:00"),
    }
    messages = [
        (b"{}", properties(name, raw.table([("bj-parked-at", value)])))
        for name, value in times.items()
    ]
    far = raw.table([("bj-first-failed-at", raw.field_longstr(b"9999-12-31T23:59:59-14:00"))])
    messages.append((b"{}", properties(b"far-first-failure", far)))
    queue = await parked_queue(broker, messages)
    for args in (["list"], ["list", "--json"], ["list", "--older-than", "1h"]):
        listed = await asyncio.to_thread(cli, *args[:1], queue, *args[1:])
        assert listed.returncode == 0, listed.stderr.decode()[-2000:]
    assert b"naive" in listed.stdout  # read as UTC: 2026-01-01 is older than an hour
    for name in [*times, b"far-first-failure"]:
        shown = await asyncio.to_thread(cli, "show", queue, name.decode())
        assert shown.returncode == 0, shown.stderr.decode()[-2000:]
    assert (
        b"2026-01-01T00:00:00.000Z" in (await asyncio.to_thread(cli, "show", queue, "naive")).stdout
    )


async def test_export_then_purge_expecting_it_works_on_a_quorum_parking_queue(
    broker: Broker, tmp_path: Path
) -> None:
    # Each scan returns the messages it kept, and a quorum queue counts that in x-delivery-count.
    app = App(unique("qpark"), queue_kind="quorum")
    queue = app.queue(f"{app.name}.q", "x.*").name
    [parking] = [q for q in app.topology().queues if q.role == "parking"]
    channel = await broker.fresh_channel()
    for name, arguments in ((queue, {}), (parking.name, parking.arguments)):
        broker.track_queue(name)
        await channel.declare_queue(name, arguments)
    for n in range(3):
        await channel.publish(
            OutgoingMessage(b"{}", f"job-{n}", "x.job", None, {}), "", parking.name
        )
    path = tmp_path / "parked.jsonl"
    async with ParkingLot(make_settings(), queue) as lot:
        exported = await lot.export(path)
        assert exported.summary is not None and exported.summary.count == 3
        await lot.list()  # another look before the purge, as an operator would
        purged = await lot.purge(expect=exported.summary)
        assert purged.purged == 3
        assert sorted((await lot.import_(path)).published) == ["job-0", "job-1", "job-2"]
