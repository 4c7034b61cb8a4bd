"""The operators' recipe on the real broker: export, purge, import loses and changes nothing;
an export or a replay that fails says so, exits 1 and leaves every job where it was."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from brokerjobs import amqp_types as at
from brokerjobs.broker.amqp.properties import MAX_PROPERTIES_BYTES
from brokerjobs.broker.amqp.properties import encode_properties as _encode_properties
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.parking import ParkingLot
from brokerjobs.topology import parking_queue_name
from tests.support.amqp_strategies import every_type_headers
from tests.support.broker import TEST_URL, Broker, make_settings, unique
from tests.support.codec_checks import park_copy, wire_of

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, limit_file_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:  # runs in the child: writes past the limit fail with EFBIG
        assert limit_file_bytes is not None
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "brokerjobs.cli", "parked", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "BROKERJOBS_URL": TEST_URL},
        cwd=REPO,
        timeout=120,
        check=False,
        preexec_fn=limit if limit_file_bytes else None,
    )


def varied(n: int) -> OutgoingMessage:
    """A job with every property set and a header of every AMQP field type."""
    return OutgoingMessage(
        body=f'{{"n":{n}}}'.encode(),
        message_id=f"job-{n:04d}",
        job_name="payment.capture",
        priority=n % 10 if n % 3 else None,
        headers=every_type_headers(n),
        timestamp=datetime.fromtimestamp(1_700_000_000 + n, UTC)
        if n % 2
        else at.Timestamp(n << 50),
        content_encoding="identity",
        delivery_mode=(None, 1, 2)[n % 3],
        correlation_id=f"corr-{n}",
        app_id="shop",
        reply_to=f"reply.{n}",
        user_id="guest" if n % 4 else None,
        expiration_ms=3_600_000 if n % 5 else None,
        cluster_id="c" if n % 7 == 0 else None,
    )


async def park_varied(broker: Broker, queue: str, count: int) -> None:
    """``count`` varied jobs published to ``queue``, taken and parked as a worker parks them."""
    channel = await broker.fresh_channel()
    for name in (queue, parking_queue_name(queue)):
        broker.track_queue(name)
        await channel.declare_queue(name, {})
    assert not await channel.publish_many(((varied(n), "", queue) for n in range(count)), 500)
    delivered = await broker.drain(queue)
    copies = ((park_copy(d, queue), "", parking_queue_name(queue)) for d in delivered)
    assert not await channel.publish_many(copies, 500)


async def parked(queue: str) -> dict[str, Delivery]:
    async with ParkingLot(make_settings(), queue) as lot:
        return {job.job_id: job.delivery for job in (await lot.list()).jobs}


async def test_the_readme_recipe_on_1000_jobs_of_every_type_loses_and_changes_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    queue = unique("recipe")
    await park_varied(broker, queue, 1000)
    before = await parked(queue)
    backup = tmp_path / "backup.jsonl"

    exported = await asyncio.to_thread(cli, "export", queue, str(backup))
    assert exported.returncode == 0, exported.stderr
    found = re.search(r"exported (\d+) job\(s\) .*; sha256 (\w+);", exported.stdout)
    assert found is not None, exported.stdout
    count, checksum = found.groups()
    assert count == "1000"
    wrong = await asyncio.to_thread(
        cli, "purge", queue, "--yes", "--expect-count", "999", "--expect-checksum", checksum
    )
    assert wrong.returncode == 1 and "refusing to purge" in wrong.stderr
    assert await broker.depth(parking_queue_name(queue)) == 1000
    purge = await asyncio.to_thread(
        cli, "purge", queue, "--yes", "--expect-count", count, "--expect-checksum", checksum
    )
    assert purge.returncode == 0, purge.stderr
    assert await broker.depth(parking_queue_name(queue)) == 0

    imported = await asyncio.to_thread(cli, "import", queue, str(backup))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.count("published job-") == 1000
    again = await asyncio.to_thread(cli, "import", queue, str(backup))
    assert again.returncode == 0 and again.stdout.count("skipped job-") == 1000
    after = await parked(queue)
    lost = before.keys() - after.keys()
    changed = [i for i in before.keys() & after.keys() if wire_of(before[i]) != wire_of(after[i])]
    print(f"\nrecipe on {len(before)} jobs: {len(lost)} lost, {len(changed)} changed, "
          f"{len(after) - len(before)} extra")  # fmt: skip
    assert (len(after), lost, changed) == (1000, set(), [])


async def test_an_export_that_cannot_write_a_record_fails_and_leaves_no_file(
    broker: Broker, tmp_path: Path
) -> None:
    queue = unique("full")
    await park_varied(broker, queue, 50)
    target = tmp_path / "backup.jsonl"
    result = await asyncio.to_thread(cli, "export", queue, str(target), limit_file_bytes=20_000)
    assert result.returncode == 1
    assert re.search(r"job job-\d{4}: cannot be written: .*File too large", result.stderr), (
        result.stderr
    )
    assert await asyncio.to_thread(os.listdir, tmp_path) == []  # no target, no partial file
    assert await broker.depth(parking_queue_name(queue)) == 50


async def test_a_replay_copy_that_cannot_be_encoded_stays_parked_and_fails_the_command(
    broker: Broker,
) -> None:
    queue = unique("unsendable")
    await park_varied(broker, queue, 3)
    # Fits one frame as parked; the replay copy adds bj-attempt and bj-replays and does not.
    big = OutgoingMessage(b"{}", "too-big", "payment.capture", None, {"pad": ""})
    big.headers["pad"] = "x" * (MAX_PROPERTIES_BYTES - len(_encode_properties(big, "too-big")) - 4)
    channel = await broker.fresh_channel()
    await channel.publish(big, "", parking_queue_name(queue))

    result = await asyncio.to_thread(cli, "replay", queue)
    assert result.returncode == 1
    assert re.search(r"^kept too-big: .*more than one AMQP frame holds", result.stderr, re.M)
    assert "never retrieved" not in result.stderr
    assert "replayed 3 job(s)" in result.stdout and "1 still parked" in result.stdout
    assert list(await parked(queue)) == ["too-big"]
    assert await broker.depth(queue) == 3
