"""`parked show` and `list` for people: traceback as lines, one time form, headers by owner."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from brokerjobs.amqp_types import Int8, LongString, Timestamp
from brokerjobs.envelope import Delivery
from brokerjobs.parked import ParkedJob
from brokerjobs.parked_view import render_job, table_rows, utc_text

TRACEBACK = 'Traceback (most recent call last):\n  File "jobs.py", line 3\nValueError: bad'


def parked(**headers: object) -> ParkedJob:
    return ParkedJob(
        Delivery(
            body=b'{"to": "a@example.com"}',
            delivery_tag=1,
            exchange="",
            routing_key="shop.emails.parked",
            redelivered=False,
            message_id="3f2a",
            job_name="email.send",
            content_type="application/json",
            timestamp=datetime(2026, 12, 1, 10, 33, 26, tzinfo=UTC),
            delivery_mode=2,
            headers={
                "bj-attempt": Int8(5),
                "bj-error-type": "builtins.ValueError",
                "bj-error-traceback": LongString(TRACEBACK.encode()),
                "bj-park-reason": "bad",
                "bj-parked-at": "2026-12-01T10:33:26.123+00:00",
                "bj-first-failed-at": "2026-12-01T11:33:20.000+01:00",
                **headers,
            },
        )
    )


def section(text: str, title: str) -> list[str]:
    lines = text.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0]
    return lines.splitlines()


def test_every_time_is_printed_in_one_iso_form_in_utc() -> None:
    berlin = timezone(timedelta(hours=1))
    assert utc_text(datetime(2026, 12, 1, 11, 33, 26, 123456, tzinfo=berlin)) == (
        "2026-12-01T10:33:26.123Z"
    )
    assert utc_text(datetime(2026, 12, 1, 10, 33, 26)) == "2026-12-01T10:33:26.000Z"  # AMQP: UTC
    assert utc_text(None) == "-"


def test_show_prints_the_traceback_as_lines_and_times_in_one_form() -> None:
    text = render_job(parked(), "shop.emails.parked")
    assert section(text, "traceback") == [f"  {line}" for line in TRACEBACK.splitlines()]
    assert "\\n" not in text
    assert "  parked at  2026-12-01T10:33:26.123Z" in text
    assert "  timestamp      2026-12-01T10:33:26.000Z" in text  # the property, a datetime
    assert "bj-first-failed-at  2026-12-01T10:33:20.000Z" in text  # converted to UTC
    assert "+00:00" not in text
    assert "  attempts   5" in text  # a typed header int prints as its number


def test_show_groups_headers_by_who_set_them() -> None:
    death = {
        "count": 1,
        "reason": "rejected",
        "queue": "shop.emails",
        "time": datetime(2026, 12, 1, 10, 0, tzinfo=UTC),
        "exchange": "",
        "routing-keys": ["shop.emails"],
    }
    job = parked(**{
        "x-death": [death],
        "x-first-death-reason": "rejected",
        "x-delivery-count": 2,
        "x-request-id": "req-42",
        "tenant": "acme",
    })  # fmt: skip
    text = render_job(job, "shop.emails.parked")
    own = section(text, "brokerjobs headers (bj-*)")
    broker = section(text, "broker headers (x-death, x-delivery-count, ...)")
    other = section(text, "other headers (the producer's)")
    assert all(line.lstrip().startswith("bj-") for line in own)
    assert not any("bj-error-traceback" in line for line in own)  # shown above, as lines
    assert broker[0].strip() == "x-death"
    assert broker[1].strip() == (
        "- count=1, reason=rejected, queue=shop.emails, time=2026-12-01T10:00:00.000Z, "
        'exchange="", routing-keys=[shop.emails]'
    )
    assert [line.split()[0] for line in broker[2:]] == ["x-delivery-count", "x-first-death-reason"]
    assert [line.split()[0] for line in other] == ["tenant", "x-request-id"]


def test_a_timestamp_beyond_datetime_is_shown_raw_not_reinterpreted() -> None:
    job = parked(**{"bj-scheduled-for": Timestamp(2**40)})
    assert f"{2**40} (a raw timestamp beyond year 9999)" in render_job(job, "q.parked")


def test_list_prints_parked_at_in_the_same_form() -> None:
    assert table_rows([parked()]) == [[
        "3f2a", "email.send", "bad", "5", "2026-12-01T10:33:26.123Z",
    ]]  # fmt: skip
