"""100 poison messages of each kind among 1,000 good jobs: a worker process handles every good
job, parks each poison message once with a reason naming what was wrong, holds nothing unacked,
never reconnects, and exits 0 on SIGTERM.

Some poison is sent as hand-built frames (``tests/support/raw_amqp.py``): values a well-behaved
client refuses to encode, such as a timestamp in microseconds since the epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiormq
import pytest

from brokerjobs.envelope import PARK_REASON, Delivery, OutgoingMessage, new_job_id
from brokerjobs.provision import declare
from tests.support import raw_amqp as raw
from tests.support.broker import TEST_URL, Broker, unique, wait_for
from tests.support.fault_app import read_records
from tests.support.poison_app import JOB_NAME, build_app

REPO_ROOT = Path(__file__).resolve().parents[2]
EACH = 100
GOOD = 1000
pytestmark = pytest.mark.slow

# kind -> (what the park reason must say, or None when the message is valid and handled)
EXPECTED: dict[str, str | None] = {
    "deep-nesting": "nested deeper than 64",
    "huge-integer": "more than 4300 digits",
    "charset": "is not UTF-8",
    "json-with-params": None,
    "bad-headers-failing": "gave up after 2 attempts",
    "no-type-failing": "gave up after 2 attempts",
    "microsecond-timestamp": None,
    "exotic-header-types": None,
}


def body(n: int, fail: bool = False, payload: object = None) -> bytes:
    return json.dumps({"n": n, "fail": fail, "payload": payload}).encode()


def message(
    data: bytes,
    job_name: str | None = JOB_NAME,
    headers: Mapping[str, Any] | None = None,
    **kw: object,
) -> OutgoingMessage:
    out = OutgoingMessage(data, new_job_id(), job_name, 0, dict(headers or {}))
    for key, value in kw.items():
        setattr(out, key, value)
    return out


BUILDERS: dict[str, Callable[[int], OutgoingMessage]] = {
    "deep-nesting": lambda n: message(b'{"n": 1, "payload": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
    "huge-integer": lambda n: message(b'{"n": 1' + b"0" * 5000 + b"}"),
    "charset": lambda n: message(body(n), content_type="application/json; charset=latin-1"),
    "json-with-params": lambda n: message(
        body(n), content_type=("Application/JSON", "application/json; charset=UTF-8")[n % 2]
    ),
    "bad-headers-failing": lambda n: message(
        body(n, fail=True),
        headers={
            "bj-attempt": (-5, 0, "10000000000000000000000000000000", [1])[n % 4],
            "bj-schema-version": bytearray(b"\xff"),
            "bj-replays": "many",
            "traceparent": "00-not-hex-at-all-01",
        },
    ),
    "no-type-failing": lambda n: message(body(n, fail=True), job_name=None),
}


def raw_frames(n: int) -> dict[str, raw.RawProperties]:
    micro = int(time.time() * 1_000_000)  # a Go/Java producer's classic unit bug
    exotic = raw.table(
        [
            ("decimal", raw.field_decimal(2, 12345)),
            ("void", raw.VOID),
            ("bytes", raw.field_bytes(b"\x00\xff\xfe")),
            ("array", raw.array([raw.field_int8(1), raw.VOID, raw.field_longstr(b"\xff")])),
            ("nested", raw.field_table([("deep", raw.field_table([("x", raw.field_float(0.1))]))])),
            ("huge", raw.field_int64(2**63 - 1)),
            ("double", raw.field_double(0.1)),
            ("when", raw.field_timestamp(micro)),
            ("non-utf8", raw.field_longstr(b"\xc3\x28")),
            ("bj-attempt", raw.field_timestamp(2**64 - 1)),
        ]
    )
    return {
        "microsecond-timestamp": raw.RawProperties(
            new_job_id(), job_name=JOB_NAME, content_type="application/json", timestamp=micro
        ),
        "exotic-header-types": raw.RawProperties(
            new_job_id(), job_name=JOB_NAME, content_type="application/json", headers=exotic
        ),
    }


async def publish_everything(broker: Broker, exchange: str) -> dict[str, str]:
    """Publish the good jobs and 100 of each poison kind, interleaved; returns id -> kind."""
    kinds: dict[str, str] = {}
    channel = await broker.fresh_channel()
    connection = await aiormq.connect(TEST_URL)
    try:
        raw_channel = await connection.channel()
        for n in range(max(GOOD, EACH)):
            if n < GOOD:
                good = message(body(n))
                await channel.publish(good, exchange, JOB_NAME)
                kinds[good.message_id] = "good"
            if n >= EACH:
                continue
            for kind, build in BUILDERS.items():
                poison = build(n)
                await channel.publish(poison, exchange, JOB_NAME)
                kinds[poison.message_id] = kind
            for kind, properties in raw_frames(n).items():
                confirm = await raw_channel.basic_publish(
                    body(n),
                    exchange=exchange,
                    routing_key=JOB_NAME,
                    properties=properties,  # type: ignore[arg-type]
                )
                assert isinstance(confirm, aiormq.spec.Basic.Ack)
                kinds[properties.message_id] = kind
    finally:
        await connection.close()
    return kinds


def start_worker(name: str, records: Path, output: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERJOBS_")}
    env.update(
        BROKERJOBS_URL=TEST_URL,
        BROKERJOBS_PREFETCH="10",
        BROKERJOBS_HEARTBEAT="5",
        BROKERJOBS_CONNECT_TIMEOUT="5",
        BJPOISON_NAME=name,
        BJPOISON_LOG=str(records),
        PYTHONUNBUFFERED="1",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "brokerjobs.cli", "worker", "tests.support.poison_app:app"],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=output.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def test_poison_mix_parks_each_bad_message_once_and_handles_every_good_one(
    broker: Broker, tmp_path: Path
) -> None:
    name = unique("poisonmix")
    records, output = tmp_path / "records", tmp_path / "worker.log"
    app = broker.track(build_app(name, str(records)))
    await declare(broker.connection, app.topology())
    queue = f"{name}.jobs"
    kinds = await publish_everything(broker, app.exchange)
    handled_kinds = {k for k, why in EXPECTED.items() if why is None} | {"good"}
    must_handle = {i for i, kind in kinds.items() if kind in handled_kinds}
    must_park = {i for i, kind in kinds.items() if kind not in handled_kinds}
    worker = start_worker(name, records, output)
    try:
        parked = await settled(broker, queue, worker, records, output, must_handle, must_park)
        assert await broker.depth(queue) == 0
        worker.send_signal(signal.SIGTERM)
        await wait_for(lambda: worker.poll() is not None, timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    log = output.read_text()
    done = read_records(records).done_ids()
    parked_ids = Counter(d.message_id for d in parked)
    print(f"\n[poison-mix] published={len(kinds)} handled={len(done)} parked={len(parked)}")
    assert worker.returncode == 0, log[-3000:]
    assert "reconnecting" not in log, log[-3000:]
    assert sorted(done) == sorted(must_handle)  # each once: no duplicates, no poison handled
    assert set(parked_ids) == must_park and set(parked_ids.values()) == {1}
    for delivery in parked:
        reason = str(delivery.headers.get(PARK_REASON))
        assert str(EXPECTED[kinds[delivery.message_id or ""]]) in reason, reason
    no_type = [d for d in parked if kinds[d.message_id or ""] == "no-type-failing"]
    assert {d.original_job_name for d in no_type} == {JOB_NAME}  # it survived the retry hop
    assert {d.job_name for d in no_type} == {None}  # and `type` stays absent: a faithful copy


async def settled(
    broker: Broker,
    queue: str,
    worker: subprocess.Popen[bytes],
    records: Path,
    output: Path,
    must_handle: set[str],
    must_park: set[str],
) -> list[Delivery]:
    """Wait until every good job is handled and every bad one parked; the parked messages."""
    parked: list[Delivery] = []

    async def all_settled() -> bool:
        if worker.poll() is not None:
            raise AssertionError(f"worker exited {worker.returncode}: {text_of(output)}")
        parked.extend(await broker.drain(f"{queue}.parked"))
        return (
            len(parked) >= len(must_park) and set(read_records(records).done_ids()) >= must_handle
        )

    try:
        await wait_for(all_settled, timeout=240, interval=0.5)
    except AssertionError:
        handled = len(set(read_records(records).done_ids()) & must_handle)
        raise AssertionError(
            f"handled {handled} of {len(must_handle)}, parked {len(parked)} of "
            f"{len(must_park)}; worker log:\n{text_of(output)[-3000:]}"
        ) from None
    return parked


def text_of(path: Path) -> str:
    return path.read_text()
