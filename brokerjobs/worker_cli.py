"""``brokerjobs worker`` and ``brokerjobs scheduler``: the long-running commands.

Kept light: the worker's start-up imports Click and this module, never Rich.
"""

from __future__ import annotations

import logging
import os

import click

from brokerjobs.cli_support import Exit, app_argument, examples, load_app, run, start
from brokerjobs.settings import Settings

log = logging.getLogger("brokerjobs.cli")


@click.command(
    short_help="run an app's handlers",
    epilog=examples(
        "brokerjobs worker shop.jobs:app",
        "brokerjobs worker shop.jobs:app --queues shop.emails --prefetch 20",
        "brokerjobs worker shop.jobs:app --processes 4",
    ),
)
@app_argument
@click.option(
    "--prefetch",
    type=click.IntRange(min=1),
    metavar="N",
    help="jobs each queue runs at once [default: $BROKERJOBS_PREFETCH]",
)
@click.option(
    "--queues",
    metavar="Q1,Q2",
    help="consume only these of the app's queues (comma-separated) [default: all]",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="run N worker processes under a supervisor (1: this process)",
)
def worker(app: str, prefetch: int | None, queues: str | None, processes: int) -> int:
    """Run an app's handlers until SIGTERM or Ctrl-C, which drain the jobs in hand first."""
    settings = start(prefetch=prefetch)
    return run(_worker(app, settings, queues, processes, prefetch))


async def _worker(
    path: str, settings: Settings, queues: str | None, processes: int, prefetch: int | None
) -> int:
    app = load_app(path)
    selected = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    if processes > 1:
        from brokerjobs.supervisor import run_supervisor

        app.select_queues(selected)  # a wrong queue name fails here, not in N children
        passed = ["--queues", queues] if queues else []
        if prefetch:
            passed += ["--prefetch", str(prefetch)]
        return await run_supervisor(path, processes, settings, passed)
    from brokerjobs.telemetry import configure_from_environment
    from brokerjobs.worker import run_worker

    if configure_from_environment(os.environ):
        log.info("exporting traces and metrics over OTLP")
    await run_worker(app, settings, selected)
    return Exit.OK


@click.command(
    short_help="publish an app's scheduled jobs",
    epilog=examples("brokerjobs scheduler shop.jobs:app"),
)
@app_argument
def scheduler(app: str) -> int:
    """Publish an app's scheduled jobs on time; run two or more for availability."""
    from brokerjobs.scheduler import run_scheduler

    settings = start()

    async def schedule() -> None:
        await run_scheduler(load_app(app), settings)

    return run(schedule())
