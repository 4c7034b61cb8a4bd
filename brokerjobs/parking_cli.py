"""``brokerjobs parked list|show|replay|purge|export|import``: the operators' replay tool, thin
over ``brokerjobs.parking``; ``parked_view`` renders jobs for people."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from brokerjobs import cli_output, parked_view
from brokerjobs.archive import Summary
from brokerjobs.cli_support import CliError, Duration, Exit, Regex, examples, run
from brokerjobs.cli_support import start as start_cli
from brokerjobs.errors import ParkingError
from brokerjobs.parking import ParkingLot, Report, Selection
from brokerjobs.validation import printable

_p = printable  # ids and reasons come from producers: never raw to a terminal

F = TypeVar("F", bound=Callable[..., Any])
Action = Callable[[ParkingLot], Coroutine[Any, Any, int]]


def on_lot(queue: str, action: Action) -> int:
    """Run ``action`` on ``queue``'s parking lot: a missing queue is exit 3."""
    settings = start_cli()

    async def act() -> int:
        try:
            async with ParkingLot(settings, queue) as lot:
                return await action(lot)
        except ParkingError as exc:
            code = Exit.NOT_FOUND if "does not exist" in str(exc) else Exit.FAILURE
            raise CliError(str(exc), code) from None

    return run(act())


def queue_argument(function: F) -> F:
    return click.argument(
        "queue",
        help="the main queue, e.g. shop.emails (its jobs park in QUEUE.parked)",
    )(function)


def filters(function: F) -> F:
    """The options that select parked jobs; all given must match."""
    options = [
        click.option("--id", "ids", multiple=True, metavar="ID", help="this job id (repeatable)"),
        click.option(
            "--job", "jobs", multiple=True, metavar="NAME", help="this job name (repeatable)"
        ),
        click.option("--error", metavar="TEXT", help="the error contains TEXT (case-insensitive)"),
        click.option("--error-regex", type=Regex(), metavar="RE", help="the error matches RE"),
        click.option(
            "--older-than", type=Duration(), metavar="D", help="parked longer ago than D, e.g. 2h"
        ),
        click.option(
            "--newer-than", type=Duration(), metavar="D", help="parked within D, e.g. 30m"
        ),
        click.option("--limit", type=click.IntRange(min=1), metavar="N", help="at most N jobs"),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def selection(
    ids: tuple[str, ...] = (),
    jobs: tuple[str, ...] = (),
    error: str | None = None,
    error_regex: re.Pattern[str] | None = None,
    older_than: timedelta | None = None,
    newer_than: timedelta | None = None,
    limit: int | None = None,
) -> Selection:
    return Selection(
        ids=frozenset(ids),
        job_names=frozenset(jobs),
        error_contains=error,
        error_regex=error_regex,
        older_than=older_than,
        newer_than=newer_than,
        limit=limit,
    )


@click.group(
    short_help="inspect, replay, purge, export or import parked jobs",
    epilog=examples("brokerjobs parked list shop.emails"),
)
def parked() -> None:
    """Inspect, replay, purge, export or import the jobs parked for a queue."""


@parked.command(
    "list",
    short_help="list parked jobs (nothing moves)",
    epilog=examples(
        "brokerjobs parked list shop.emails",
        "brokerjobs parked list shop.emails --error SMTP --json | jq .id",
    ),
)
@queue_argument
@filters
@click.option("--json", "as_json", is_flag=True, help="one JSON object per job and line")
def list_command(queue: str, as_json: bool, **chosen: Any) -> int:
    """List parked jobs: id, job, error, attempts, parked at. Nothing moves; exit 0 even when
    nothing is parked."""

    async def action(lot: ParkingLot) -> int:
        report = await lot.list(selection(**chosen))
        if as_json:
            for job in report.jobs:
                cli_output.print_json(job.summary(), indent=None)
            return Exit.OK
        if report.jobs:
            rows = parked_view.table_rows(report.jobs)
            cli_output.show(cli_output.table(parked_view.COLUMNS, rows, wrap="ERROR"))
        click.echo(f"{len(report.jobs)} of {report.scanned} parked job(s) in {lot.parking_queue}")
        return Exit.OK  # nothing parked is healthy: `parked list || alert` must not alert

    return on_lot(queue, action)


@parked.command(
    "show",
    short_help="show one parked job: envelope and payload",
    epilog=examples("brokerjobs parked show shop.emails 3f2a9c..."),
)
@queue_argument
@click.argument("job_id", metavar="ID", help="the job's id (from parked list)")
@click.option("--json", "as_json", is_flag=True, help="the envelope as one JSON object")
def show(queue: str, job_id: str, as_json: bool) -> int:
    """Show one parked job: its error and traceback, payload, properties and headers. Exit 4
    if no job of that id is parked."""

    async def action(lot: ParkingLot) -> int:
        report = await lot.list(Selection(ids=frozenset({job_id})))
        if not report.jobs:
            raise CliError(f"no parked job {job_id!r} in {lot.parking_queue}", Exit.NOTHING)
        for job in report.jobs:
            if as_json:
                cli_output.print_json(parked_view.details(job))
            else:
                click.echo(parked_view.render_job(job, lot.parking_queue))
        return Exit.OK

    return on_lot(queue, action)


@parked.command(
    "replay",
    short_help="send parked jobs back to their queue",
    epilog=examples(
        'brokerjobs parked replay shop.emails --error "SMTP" --dry-run',
        'brokerjobs parked replay shop.emails --error "SMTP" --rate 200',
        "brokerjobs parked replay shop.emails --validate shop.jobs:app",
    ),
)
@queue_argument
@filters
@click.option("--dry-run", is_flag=True, help="list what would be replayed; nothing moves")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="N",
    help="at most N jobs per second",
)
@click.option(
    "--validate", metavar="MODULE:APP", help="keep jobs whose payload the app's models reject"
)
def replay(
    queue: str, dry_run: bool, rate: float | None, validate: str | None, **chosen: Any
) -> int:
    """Send parked jobs back to their queue, each published with a confirm before its parked
    copy is acked. A progress bar shows on a terminal. Exit 4 if nothing matched."""  # fmt: skip
    return on_lot(queue, lambda lot: _replay(lot, selection(**chosen), dry_run, rate, validate))


async def _replay(
    lot: ParkingLot, chosen: Selection, dry_run: bool, rate: float | None, app: str | None
) -> int:
    from brokerjobs.cli_support import load_app

    validate = load_app(app).jobs(lot.queue) if app else None
    with cli_output.progress_bar("scanning") as advance:
        shown: Callable[[Report, int], None] | None = None
        if advance is not None:
            shown = lambda report, total: advance(report.scanned, total)  # noqa: E731
        report = await lot.replay(
            chosen, dry_run=dry_run, rate=rate, validate=validate, progress=shown
        )
    if dry_run:
        cli_output.show(
            cli_output.table(parked_view.COLUMNS, parked_view.table_rows(report.jobs), wrap="ERROR")
        )
        click.echo(f"dry run: {len(report.jobs)} job(s) would be replayed to {lot.queue}")
    else:
        click.echo(f"replayed {report.replayed} job(s) to {lot.queue}; {report.kept} still parked")
    for job_id, reason in report.invalid:
        click.echo(f"kept {_p(job_id)}: payload invalid: {_p(reason)}", err=True)
    for job_id, reason in report.failed:
        click.echo(f"kept {_p(job_id)}: {_p(reason)}", err=True)
    if report.failed:
        return Exit.FAILURE
    return Exit.OK if report.jobs else Exit.NOTHING


@parked.command(
    "purge",
    short_help="delete parked jobs",
    epilog=examples(
        "brokerjobs parked purge shop.emails --id 3f2a9c... --yes",
        "brokerjobs parked purge shop.emails --yes --expect-count 1000 --expect-checksum 5be1...",
    ),
)
@queue_argument
@filters
@click.option("--yes", is_flag=True, help="do not ask first (needed without a terminal)")
@click.option(
    "--expect-count",
    type=click.IntRange(min=0),
    metavar="N",
    help="purge only if exactly N jobs match",
)
@click.option(
    "--expect-checksum",
    metavar="SHA256",
    help="purge only if the matching jobs are exactly those an export with this checksum holds "
    "(with --expect-count)",
)
def purge(
    queue: str, yes: bool, expect_count: int | None, expect_checksum: str | None, **chosen: Any
) -> int:
    """Delete parked jobs for good; it asks first unless --yes. Exit 4 if nothing matched."""
    if expect_checksum and expect_count is None:
        raise CliError("--expect-checksum needs --expect-count", Exit.USAGE)
    expect = None
    if expect_checksum and expect_count is not None:
        expect = Summary(expect_count, expect_checksum)
    return on_lot(queue, lambda lot: _purge(lot, selection(**chosen), yes, expect, expect_count))


async def _purge(
    lot: ParkingLot, chosen: Selection, yes: bool, expect: Summary | None, count: int | None
) -> int:
    if not yes:
        preview = await lot.list(chosen)
        if not preview.jobs:
            click.echo("nothing matches: no job purged")
            return Exit.NOTHING
        if not sys.stdin.isatty():
            raise CliError("refusing to purge without --yes (no terminal to ask)", Exit.USAGE)
        question = f"purge {len(preview.jobs)} job(s) from {lot.parking_queue}? [y/N] "
        answer = await asyncio.to_thread(input, question)
        if answer.strip().lower() not in ("y", "yes"):
            click.echo("aborted: nothing purged")
            return Exit.OK
        if count is None:  # exactly the jobs the question named
            chosen = Selection(ids=frozenset(j.job_id for j in preview.jobs))
    report = await lot.purge(chosen, expect=expect, expect_count=count)
    click.echo(f"purged {report.purged} job(s); {report.kept} still parked")
    return Exit.OK if report.purged else Exit.NOTHING


_FILE = click.Path(path_type=Path, dir_okay=False)


@parked.command(
    "export",
    short_help="write parked jobs to a JSON Lines file",
    epilog=examples("brokerjobs parked export shop.emails backup.jsonl"),
)
@queue_argument
@click.argument("file", type=_FILE, help="the JSON Lines file to write")
@filters
def export(queue: str, file: Path, **chosen: Any) -> int:
    """Write parked jobs to a JSON Lines file and print its count and sha256; nothing moves.
    Exit 4 if nothing matched."""

    async def action(lot: ParkingLot) -> int:
        report = await lot.export(file, selection(**chosen))
        summary = report.summary
        assert summary is not None
        click.echo(
            f"exported {summary.count} job(s) to {file}; sha256 {summary.sha256}; nothing was moved"
        )
        return Exit.OK if report.jobs else Exit.NOTHING

    return on_lot(queue, action)


@parked.command(
    "import",
    short_help="publish an export into the parking queue",
    epilog=examples("brokerjobs parked import shop.emails backup.jsonl"),
)
@queue_argument
@click.argument("file", type=_FILE, help="a JSON Lines file from parked export")
def import_command(queue: str, file: Path) -> int:
    """Publish a JSON Lines export into the queue's parking queue; jobs already parked there
    are skipped, so it can be run again."""
    return on_lot(queue, lambda lot: _import(lot, file))


async def _import(lot: ParkingLot, file: Path) -> int:
    report = await lot.import_(file)
    for job_id in report.published:
        click.echo(f"published {_p(job_id)}")
    for job_id in report.skipped:
        click.echo(f"skipped {_p(job_id)}: already parked")
    for job_id, reason in report.failed:
        click.echo(f"failed {_p(job_id)}: {_p(reason)}", err=True)
    click.echo(
        f"imported {len(report.published)} job(s) into {lot.parking_queue}; "
        f"{len(report.skipped)} already there; {len(report.failed)} failed"
    )
    return Exit.FAILURE if report.failed else Exit.OK
