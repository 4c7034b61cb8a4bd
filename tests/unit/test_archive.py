"""Export files: lossless for every AMQP type, all or nothing, verified on import."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from brokerjobs import amqp_types as at
from brokerjobs import amqp_values as av
from brokerjobs.archive import read_export, record_line, write_export
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.errors import ParkingError
from tests.support.amqp_strategies import every_type_headers, messages


def as_delivered(message: OutgoingMessage) -> Delivery:
    """The delivery of ``message`` as the broker hands it back (through the real codec)."""
    expiration = str(message.expiration_ms) if message.expiration_ms is not None else None
    values = {
        "content_type": message.content_type, "content_encoding": message.content_encoding,
        "headers": message.headers or None, "delivery_mode": message.delivery_mode,
        "priority": message.priority, "correlation_id": message.correlation_id,
        "reply_to": message.reply_to, "expiration": expiration, "message_id": message.message_id,
        "timestamp": message.timestamp, "type": message.job_name, "user_id": message.user_id,
        "app_id": message.app_id, "cluster_id": message.cluster_id,
    }  # fmt: skip
    wire = av.encode_properties([values[name] for name in av.PROPERTY_NAMES])
    decoded = av.decode_properties(wire)
    decoded["job_name"] = decoded.pop("type", None)
    decoded.setdefault("headers", {})
    return Delivery(body=message.body, delivery_tag=1, exchange="", routing_key="q",
                    redelivered=False, **decoded)  # fmt: skip


def wire_of(delivery: Delivery) -> tuple[Any, ...]:
    names = [n for n in av.PROPERTY_NAMES if n != "headers"]
    props = [getattr(delivery, "job_name" if n == "type" else n) for n in names]
    return (delivery.body, props, av.encode_table(delivery.headers))


@settings(max_examples=200, deadline=None)
@given(messages())
def test_an_exported_record_imports_as_the_same_message(message: OutgoingMessage) -> None:
    original = as_delivered(message)
    [restored] = _records_of(record_line(original))
    assert wire_of(restored) == wire_of(original)


def _records_of(*lines: bytes) -> list[Delivery]:
    from brokerjobs.archive import from_record

    return [from_record(json.loads(line)) for line in lines]


def test_an_export_file_is_verified_on_import(tmp_path: Path) -> None:
    deliveries = [
        as_delivered(OutgoingMessage(b"{}", f"id{n}", "j", None, every_type_headers(n)))
        for n in range(5)
    ]
    path = tmp_path / "out.jsonl"
    summary = write_export(path, deliveries)
    assert summary.count == 5
    records, read = read_export(path)
    assert read == summary
    assert [wire_of(r) for r in records] == [wire_of(d) for d in deliveries]

    lines = path.read_bytes().splitlines(keepends=True)
    for broken, why in [
        (lines[:-2] + lines[-1:], "holds 4 records"),  # a record dropped
        (lines[:-1], "no end line"),  # cut short
        ([lines[0], lines[2], lines[1], *lines[3:]], "was changed"),  # reordered
        (lines[1:], "not a brokerjobs export"),
    ]:
        path.write_bytes(b"".join(broken))
        with pytest.raises(ParkingError, match=why):
            read_export(path)


def test_an_export_that_meets_an_unwritable_record_leaves_no_file(tmp_path: Path) -> None:
    good = as_delivered(OutgoingMessage(b"{}", "good", "j", None, {}))
    bad = replace(good, message_id="bad-one", headers={"k": {1, 2}})
    target = tmp_path / "out.jsonl"
    target.write_text("the previous export\n")
    with pytest.raises(ParkingError, match="job bad-one: cannot be exported: .*set"):
        write_export(target, [good, bad])
    assert target.read_text() == "the previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_a_copy_keeps_every_property_and_absent_stays_absent() -> None:
    from brokerjobs.envelope import copy_of

    bare = Delivery(b"x", 1, "", "q", False, message_id="m")
    copy = copy_of(bare, {})
    assert (copy.priority, copy.delivery_mode, copy.content_type, copy.timestamp) == (
        None, None, None, None,
    )  # fmt: skip
    full = as_delivered(
        OutgoingMessage(
            b"x",
            "m",
            "j",
            0,
            {"h": at.Int64(1)},
            at.Timestamp(1 << 40),
            "text/plain",
            60_000,
            1,
            "c",
            "a",
            "gzip",
            "r",
            "guest",
            "cl",
        )
    )
    copy = copy_of(full, dict(full.headers))
    assert (copy.priority, copy.delivery_mode, copy.content_encoding, copy.reply_to) == (
        0, 1, "gzip", "r",
    )  # fmt: skip
    assert (copy.timestamp, copy.cluster_id, copy.user_id, copy.expiration_ms) == (
        at.Timestamp(1 << 40), "cl", None, None,
    )  # fmt: skip
    assert copy.headers == {
        "h": 1, "bj-original-user-id": "guest", "bj-original-expiration": "60000",
    }  # fmt: skip
    assert type(copy.headers["h"]) is at.Int64
