"""Parked jobs for people: the ``parked list`` rows and the ``parked show`` page (traceback as
lines, every time in one ISO-8601 form in UTC, headers grouped by who set them); ``--json``
prints ``details`` unchanged, for scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from brokerjobs import envelope as wire
from brokerjobs.amqp_values import Timestamp
from brokerjobs.envelope import DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_JSON_NUMBER_DIGITS, Delivery
from brokerjobs.parking import ParkedJob
from brokerjobs.validation import json_limit_problem, printable

COLUMNS = (("ID", "left"), ("JOB", "left"), ("ERROR", "left"), ("ATTEMPTS", "right"),
           ("PARKED AT", "left"))  # fmt: skip


def table_rows(jobs: list[ParkedJob]) -> list[list[str]]:
    """One row per job under ``COLUMNS``; errors cut to 60 characters."""
    rows = []
    for job in jobs:
        error = printable(job.summary()["error"])
        error = error if len(error) <= 60 else error[:57] + "..."
        rows.append(
            [
                printable(job.job_id),
                printable(job.job_name),
                error,
                str(int(job.attempts)),
                utc_text(job.parked_at),
            ]
        )
    return rows


_NOT_JSON = object()


def _json_payload(body: bytes) -> Any:
    """The body as JSON, or _NOT_JSON; never beyond the worker's limits (a body nested deeper
    than the recursion limit raises RecursionError in json.loads, and in dumps far sooner)."""
    if json_limit_problem(body, DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_JSON_NUMBER_DIGITS):
        return _NOT_JSON
    try:
        return json.loads(body)
    except ValueError:
        return _NOT_JSON


def details(job: ParkedJob) -> dict[str, Any]:
    delivery = job.delivery
    payload = _json_payload(delivery.body)
    if payload is _NOT_JSON:
        payload = repr(delivery.body[:2000])
    return {
        **job.summary(),
        "payload": payload,
        "properties": {
            "content_type": delivery.content_type,
            "priority": delivery.priority,
            "timestamp": delivery.timestamp,
            "correlation_id": delivery.correlation_id,
            "reply_to": delivery.reply_to,
            "delivery_mode": delivery.delivery_mode,
        },
        "headers": delivery.headers,
    }


_PROPERTIES = (
    "message_id", "job_name", "content_type", "content_encoding", "delivery_mode", "priority",
    "timestamp", "correlation_id", "reply_to", "expiration", "user_id", "app_id", "cluster_id",
)  # fmt: skip
_BROKER_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
_BROKER_EXTRA = ("x-received-from", "x-shovelled", "x-shovelled-timestamp", "x-opt-deaths")


def utc_text(value: datetime | None) -> str:
    """The one form of every time printed for people: ISO 8601 in UTC, milliseconds, ``Z``."""
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # AMQP timestamps are seconds since the epoch, UTC
    try:
        value = value.astimezone(UTC)
    except OverflowError:  # a producer's time within a day of year 1 or 9999
        return value.isoformat(timespec="milliseconds")
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_job(job: ParkedJob, parking_queue: str) -> str:
    """One parked job for people: facts first, the traceback as lines, headers by owner."""
    delivery = job.delivery
    own, broker, other = _header_groups(delivery.headers)
    traceback = own.pop(wire.ERROR_TRACEBACK, None)
    sections = [
        f"parked job {printable(job.job_id)} ({printable(job.job_name)}) in {parking_queue}",
        *(
            f"  {printable(row)}"
            for row in _rows(
                {
                    "error": f"{job.error_type}: {job.error}",
                    "attempts": int(job.attempts),
                    "replays": int(job.replays),
                    "parked at": utc_text(job.parked_at),
                }
            )
        ),
        _section("traceback", _text(traceback).split("\n") if traceback else ["(none)"]),
        _section("payload", _payload_lines(delivery.body)),
        _section("properties", _rows(_properties(delivery))),
        _section("brokerjobs headers (bj-*)", _header_lines(own, times=True)),
        _section("broker headers (x-death, x-delivery-count, ...)", _header_lines(broker)),
        _section("other headers (the producer's)", _header_lines(other)),
    ]
    return "\n".join(sections)


def _header_groups(
    headers: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    own: dict[str, Any] = {}
    broker: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for name, value in sorted(headers.items()):
        if name.startswith("bj-"):
            own[name] = value
        elif name.startswith(_BROKER_PREFIXES) or name in _BROKER_EXTRA:
            broker[name] = value
        else:
            other[name] = value
    return own, broker, other


def _properties(delivery: Delivery) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for name in _PROPERTIES:
        value = getattr(delivery, name)
        if value is not None:
            shown["type" if name == "job_name" else name] = _value(value)
    return shown


def _header_lines(headers: Mapping[str, Any], *, times: bool = False) -> list[str]:
    if not headers:
        return ["(none)"]
    lines: list[str] = []
    width = max(len(name) for name in headers)
    for name, value in headers.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            lines.append(name)  # x-death: one line per (queue, reason)
            lines.extend(f"  - {_value(entry)}" for entry in value)
            continue
        text = (_iso_text(value) if times else None) or _value(value)
        lines.append(f"{printable(name).ljust(width)}  {text}")
    return lines


def _iso_text(value: Any) -> str | None:
    """brokerjobs' own times are ISO strings (``bj-parked-at``): print them in the one form."""
    text = _text(value)
    if "T" not in text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return utc_text(parsed) if parsed.tzinfo else None


def _value(value: Any) -> str:
    if isinstance(value, datetime):
        return utc_text(value)
    if isinstance(value, Timestamp):
        return f"{int(value)} (a raw timestamp beyond year 9999)"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(int(value))  # a typed header int (Int8(1)) prints as its number
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, bytes):
        return _text(value)
    return str(value) or '""'  # the default exchange, say: visibly empty, not a blank


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return repr(value[:2000])
    return str(value)


def _payload_lines(body: bytes) -> list[str]:
    payload = _json_payload(body)
    if payload is _NOT_JSON:
        problem = json_limit_problem(body, DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_JSON_NUMBER_DIGITS)
        return [f"({problem or 'not JSON'}, {len(body)} bytes) {body[:2000]!r}"]
    return json.dumps(payload, indent=2, ensure_ascii=False).splitlines()


def _rows(fields: Mapping[str, Any]) -> list[str]:
    width = max((len(name) for name in fields), default=0)
    return [f"{name.ljust(width)}  {value}" for name, value in fields.items()]


def _section(title: str, lines: list[str]) -> str:
    return "\n" + title + "\n" + "\n".join(f"  {printable(line)}" for line in lines)
