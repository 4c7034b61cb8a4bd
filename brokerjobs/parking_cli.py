"""``brokerjobs parked ...``: the operators' replay tool, thin over ``brokerjobs.parking``.

Exit codes: 0 done (``list`` of nothing included), 1 broker, publish, export or import failure
(or ``purge --expect-*`` found other jobs than expected: nothing purged), 2 usage, 3 queue not
found, 4 nothing matched (``replay``, ``purge``, ``export``, or ``show`` of an unknown id).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from brokerjobs import envelope as wire
from brokerjobs.amqp_values import Timestamp
from brokerjobs.archive import Summary
from brokerjobs.envelope import Delivery
from brokerjobs.errors import ParkingError
from brokerjobs.parking import ParkedJob, ParkingLot, Report, Selection
from brokerjobs.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_NOTHING = 0, 1, 2, 3, 4
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 10m, 2h or 7d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"bad regex {text!r}: {exc}") from None


def add_parser(commands: Any) -> None:
    parked = commands.add_parser("parked", help="inspect, replay or purge parked jobs")
    actions = parked.add_subparsers(dest="action", required=True)
    for name, help_text in [
        ("list", "list parked jobs (nothing moves)"),
        ("show", "show one parked job: envelope and payload"),
        ("replay", "send parked jobs back to their queue"),
        ("purge", "delete parked jobs"),
        ("export", "write parked jobs to a JSON Lines file (nothing moves)"),
        ("import", "publish a JSON Lines export into the parking queue"),
    ]:
        action = actions.add_parser(name, help=help_text)
        action.add_argument("queue", help="the main queue (its parking queue is QUEUE.parked)")
        if name in ("export", "import"):
            action.add_argument("file", type=Path)
        if name == "show":
            action.add_argument("id")
        elif name != "import":
            _add_filters(action)
        if name == "list":
            action.add_argument("--json", action="store_true", help="one JSON object per line")
        if name == "show":
            action.add_argument("--json", action="store_true", help="the envelope as JSON")
        if name == "replay":
            action.add_argument("--dry-run", action="store_true", help="show what would move")
            action.add_argument("--rate", type=float, help="at most N jobs per second")
            action.add_argument("--validate", metavar="MODULE:APP", help="check payloads first")
        if name == "purge":
            action.add_argument("--yes", action="store_true", help="do not ask for confirmation")
            action.add_argument(
                "--expect-count", type=int, metavar="N", help="purge only if exactly N match"
            )
            action.add_argument(
                "--expect-checksum",
                metavar="SHA256",
                help="purge only if the matching jobs are exactly those an export with this "
                "checksum holds (with --expect-count)",
            )
        action.set_defaults(handler=run)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", action="append", default=[], help="job id (repeatable)")
    parser.add_argument("--job", action="append", default=[], help="job name (repeatable)")
    parser.add_argument("--error", help="error text contains (case-insensitive)")
    parser.add_argument("--error-regex", type=regex, help="error matches this regex")
    parser.add_argument("--older-than", type=duration, help="parked longer ago, e.g. 2h")
    parser.add_argument("--newer-than", type=duration, help="parked more recently, e.g. 30m")
    parser.add_argument("--limit", type=int, help="at most N jobs")


def selection_from(args: argparse.Namespace) -> Selection:
    return Selection(
        ids=frozenset(getattr(args, "id", []) or []),
        job_names=frozenset(getattr(args, "job", []) or []),
        error_contains=getattr(args, "error", None),
        error_regex=getattr(args, "error_regex", None),
        older_than=getattr(args, "older_than", None),
        newer_than=getattr(args, "newer_than", None),
        limit=getattr(args, "limit", None),
    )


async def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        async with ParkingLot(settings, args.queue) as lot:
            return await _ACTIONS[args.action](lot, args)
    except ParkingError as exc:
        print(f"brokerjobs: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND if "does not exist" in str(exc) else EXIT_FAILED


async def _list(lot: ParkingLot, args: argparse.Namespace) -> int:
    report = await lot.list(selection_from(args))
    if args.json:
        for job in report.jobs:
            print(json.dumps(job.summary()))
    else:
        if report.jobs:
            print(_table(report.jobs))
        print(f"{len(report.jobs)} of {report.scanned} parked job(s) in {lot.parking_queue}")
    return EXIT_OK  # nothing parked is a healthy answer: `parked list || alert` must not alert


async def _show(lot: ParkingLot, args: argparse.Namespace) -> int:
    report = await lot.list(Selection(ids=frozenset({args.id})))
    if not report.jobs:
        print(f"brokerjobs: no parked job {args.id!r} in {lot.parking_queue}", file=sys.stderr)
        return EXIT_NOTHING
    for job in report.jobs:
        if args.json:
            print(json.dumps(_details(job), indent=2, default=str))
        else:
            print(render_job(job, lot.parking_queue))
    return EXIT_OK


async def _replay(lot: ParkingLot, args: argparse.Namespace) -> int:
    validate = None
    if args.validate:
        from brokerjobs.cli import load_app

        app = load_app(args.validate)
        validate = app.jobs(lot.queue)
    report = await lot.replay(
        selection_from(args),
        dry_run=args.dry_run,
        rate=args.rate,
        validate=validate,
        progress=_progress_printer(),
    )
    if args.dry_run:
        print(_table(report.jobs))
        print(f"dry run: {len(report.jobs)} job(s) would be replayed to {lot.queue}")
    else:
        print(f"replayed {report.replayed} job(s) to {lot.queue}; {report.kept} still parked")
    for job_id, reason in report.invalid:
        print(f"kept {job_id}: payload invalid: {reason}", file=sys.stderr)
    for job_id, reason in report.failed:
        print(f"kept {job_id}: {reason}", file=sys.stderr)
    if report.failed:
        return EXIT_FAILED
    return EXIT_OK if report.jobs else EXIT_NOTHING


async def _purge(lot: ParkingLot, args: argparse.Namespace) -> int:
    selection = selection_from(args)
    if args.expect_checksum and args.expect_count is None:
        print("brokerjobs: --expect-checksum needs --expect-count", file=sys.stderr)
        return EXIT_USAGE
    if not args.yes:
        preview = await lot.list(selection)
        if not preview.jobs:
            print("nothing matches: no job purged")
            return EXIT_NOTHING
        if not sys.stdin.isatty():
            print(
                "brokerjobs: refusing to purge without --yes (no terminal to ask)", file=sys.stderr
            )
            return EXIT_USAGE
        question = f"purge {len(preview.jobs)} job(s) from {lot.parking_queue}? [y/N] "
        answer = await asyncio.to_thread(input, question)
        if answer.strip().lower() not in ("y", "yes"):
            print("aborted: nothing purged")
            return EXIT_OK
        if args.expect_count is None:
            selection = Selection(ids=frozenset(j.job_id for j in preview.jobs))
    expect = Summary(args.expect_count, args.expect_checksum) if args.expect_checksum else None
    report = await lot.purge(selection, expect=expect, expect_count=args.expect_count)
    print(f"purged {report.purged} job(s); {report.kept} still parked")
    return EXIT_OK if report.purged else EXIT_NOTHING


async def _export(lot: ParkingLot, args: argparse.Namespace) -> int:
    report = await lot.export(args.file, selection_from(args))
    summary = report.summary
    assert summary is not None
    print(
        f"exported {summary.count} job(s) to {args.file}; sha256 {summary.sha256}; "
        "nothing was moved"
    )
    return EXIT_OK if report.jobs else EXIT_NOTHING


async def _import(lot: ParkingLot, args: argparse.Namespace) -> int:
    report = await lot.import_(args.file)
    for job_id in report.published:
        print(f"published {job_id}")
    for job_id in report.skipped:
        print(f"skipped {job_id}: already parked")
    for job_id, reason in report.failed:
        print(f"failed {job_id}: {reason}", file=sys.stderr)
    print(
        f"imported {len(report.published)} job(s) into {lot.parking_queue}; "
        f"{len(report.skipped)} already there; {len(report.failed)} failed"
    )
    return EXIT_FAILED if report.failed else EXIT_OK


_ACTIONS = {
    "list": _list,
    "show": _show,
    "replay": _replay,
    "purge": _purge,
    "export": _export,
    "import": _import,
}


def _table(jobs: list[ParkedJob]) -> str:
    rows = [("ID", "JOB", "ERROR", "ATTEMPTS", "PARKED AT")]
    for job in jobs:
        summary = job.summary()
        error = summary["error"] if len(summary["error"]) <= 60 else summary["error"][:57] + "..."
        rows.append(
            (job.job_id, job.job_name, error, str(int(job.attempts)), utc_text(job.parked_at))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def _details(job: ParkedJob) -> dict[str, Any]:
    delivery = job.delivery
    try:
        payload: Any = json.loads(delivery.body)
    except ValueError:
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


def _progress_printer() -> Any:
    if not sys.stderr.isatty():
        return None

    def show(report: Report, total: int) -> None:
        if report.scanned % 100 == 0 or report.scanned == total:
            filled = int(30 * report.scanned / max(total, 1))
            bar = "#" * filled + "-" * (30 - filled)
            print(f"\r[{bar}] {report.scanned}/{total} scanned", end="", file=sys.stderr)
            if report.scanned == total:
                print(file=sys.stderr)

    return show


# What `parked show` prints for people; `--json` prints `_details` unchanged, for scripts.
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
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_job(job: ParkedJob, parking_queue: str) -> str:
    """One parked job for people: facts first, the traceback as lines, headers by owner."""
    delivery = job.delivery
    own, broker, other = _header_groups(delivery.headers)
    traceback = own.pop(wire.ERROR_TRACEBACK, None)
    sections = [
        f"parked job {job.job_id} ({job.job_name}) in {parking_queue}",
        *(
            f"  {row}"
            for row in _rows(
                {
                    "error": f"{job.error_type}: {job.error}",
                    "attempts": int(job.attempts),
                    "replays": int(job.replays),
                    "parked at": utc_text(job.parked_at),
                }
            )
        ),
        _section("traceback", _text(traceback).splitlines() if traceback else ["(none)"]),
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
        lines.append(f"{name.ljust(width)}  {text}")
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
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False).splitlines()
    except ValueError:
        return [f"(not JSON, {len(body)} bytes) {body[:2000]!r}"]


def _rows(fields: Mapping[str, Any]) -> list[str]:
    width = max((len(name) for name in fields), default=0)
    return [f"{name.ljust(width)}  {value}" for name, value in fields.items()]


def _section(title: str, lines: list[str]) -> str:
    return "\n" + title + "\n" + "\n".join(f"  {line}" for line in lines)
