"""``brokerjobs topology show|declare|diff|prune``: thin over ``topology``, ``provision``,
``topology_diff``, ``broker_queues`` and ``prune``.

When the broker's queues cannot be listed, diff and prune say so and fall back to
passive-declaring the names the app's naming scheme gives common delays: partial, but every name
found is one the app made, and prune deletes only when empty, so acting on it is as safe.
"""

from __future__ import annotations

import asyncio
import json
import sys

import click

from brokerjobs.broker.amqp import connect
from brokerjobs.broker_queues import (
    ListingUnavailable,
    candidate_names,
    candidate_queues,
    list_queues,
)
from brokerjobs.cli_support import (
    Exit,
    app_argument,
    examples,
    load_app,
    run,
    start,
)
from brokerjobs.prune import PruneReport, prune
from brokerjobs.settings import Settings
from brokerjobs.topology_diff import Obsolete, TopologyDiff, diff, with_depths

_GUESSING = (
    "Guessing instead: asked for the plan's queues and the retry tiers that common delays "
    "(1s to 2h) would have made. Tiers of other delays and queues of removed handlers are not "
    "seen, and arguments are not compared."
)


@click.group(
    short_help="show, declare, diff or prune exchanges and queues",
    epilog=examples("brokerjobs topology diff shop.jobs:app"),
)
def topology() -> None:
    """Show, declare, diff or prune an app's exchanges and queues."""


@topology.command(
    short_help="print the app's plan", epilog=examples("brokerjobs topology show shop.jobs:app")
)
@app_argument
def show(app: str) -> int:
    """Print the app's plan: its exchanges, queues, their arguments and bindings (no broker)."""
    start()

    async def describe() -> None:
        click.echo(load_app(app).topology().describe())

    return run(describe())


@topology.command(
    short_help="declare the plan on the broker",
    epilog=examples("brokerjobs topology declare shop.jobs:app"),
)
@app_argument
def declare(app: str) -> int:
    """Declare the app's exchanges and queues on the broker (idempotent; a worker does the
    same at start-up)."""
    return run(_declare(app, start()))


async def _declare(path: str, settings: Settings) -> None:
    from brokerjobs.provision import declare as declare_plan

    plan = load_app(path).topology()
    connection = await connect(settings, "topology")
    try:
        await declare_plan(connection, plan)
    finally:
        await connection.close()
    click.echo(f"declared exchange {plan.exchange} and {len(plan.queues)} queues")


@topology.command(
    "diff",
    short_help="what the broker has that the plan lacks, or differs",
    epilog=examples(
        "brokerjobs topology diff shop.jobs:app",
        "brokerjobs topology diff shop.jobs:app --json | jq .obsolete",
    ),
)
@app_argument
@click.option("--json", "as_json", is_flag=True, help="print the diff as one JSON object")
def diff_command(app: str, as_json: bool) -> int:
    """Compare the app's plan with the broker: obsolete queues (retry tiers of an older
    policy, queues of removed handlers) and planned queues whose arguments differ. Exit 0
    whatever it found.

    The broker's queues are read from the management API when BROKERJOBS_MANAGEMENT_URL is set
    (http://user:password@host:15672), else from `rabbitmqctl list_queues` on the broker's
    host; failing both, common tier names are guessed (partial; it says so)."""
    return run(run_diff(app, start(), as_json))


@topology.command(
    "prune",
    short_help="delete obsolete queues (only when empty)",
    epilog=examples(
        "brokerjobs topology prune shop.jobs:app",
        "brokerjobs topology prune shop.jobs:app --drain --yes",
    ),
)
@app_argument
@click.option("--drain", is_flag=True, help="move an obsolete tier's jobs to its main queue first")
@click.option("--yes", is_flag=True, help="do not ask before acting (needed without a terminal)")
def prune_command(app: str, drain: bool, yes: bool) -> int:
    """Delete the queues `topology diff` calls obsolete, each only if the broker finds it
    empty (queue.delete if-empty). --drain first moves an obsolete retry tier's jobs to its
    main queue (publish with confirm, then ack). Quorum queues are kept: see docs/cli.md."""
    return run(run_prune(app, start(), drain=drain, yes=yes))


async def compute(path: str, settings: Settings) -> TopologyDiff:
    """The diff from the broker's full list, or from guessed names when it cannot be listed;
    the obsolete queues' depths are read live (listings lag, quorum queues' by seconds)."""
    app = load_app(path)
    topology = app.topology()
    connection = await connect(settings, "topology")
    try:
        try:
            queues = await list_queues(settings.amqp_url)
        except ListingUnavailable as exc:
            print(f"brokerjobs: {exc}.\n{_GUESSING}", file=sys.stderr)
            names = [q.name for q in topology.queues] + candidate_names(topology)
            queues = await candidate_queues(connection, names)
        found = diff(topology, queues, app.name)
        live = await candidate_queues(connection, [o.name for o in found.obsolete])
    finally:
        await connection.close()
    return with_depths(found, {q.name: q.messages for q in live})


async def run_diff(path: str, settings: Settings, as_json: bool) -> int:
    found = await compute(path, settings)
    click.echo(json.dumps(found.as_json(), indent=2) if as_json else found.describe())
    return Exit.OK


async def run_prune(path: str, settings: Settings, *, drain: bool, yes: bool) -> int:
    found = await compute(path, settings)
    if not found.obsolete:
        print("nothing obsolete: nothing to prune")
        return Exit.OK
    print("\n".join(_intention(o, drain) for o in found.obsolete))
    if not yes:
        answer = await _ask(f"prune {len(found.obsolete)} queue(s)? [y/N] ")
        if answer is None:
            return Exit.USAGE
        if answer not in ("y", "yes"):
            print("aborted: nothing pruned")
            return Exit.OK
    connection = await connect(settings, "prune")
    try:
        report = await prune(connection, found.obsolete, drain=drain)
    finally:
        await connection.close()
    _print_report(report)
    return Exit.OK if report.complete else Exit.FAILURE


def _intention(found: Obsolete, drain: bool) -> str:
    held = found.queue.messages
    moving = drain and found.main is not None and held
    if found.quorum:
        first = f"move ~{held} message(s) to {found.main}, then " if moving else ""
        return f"{first}keep {found.name} (a quorum queue: no if-empty delete)"
    if moving:
        return f"move ~{held} message(s) from {found.name} to {found.main}, then delete it"
    if held:
        return f"delete {found.name} if empty (it held {held} message(s))"
    return f"delete {found.name} if empty"


async def _ask(question: str) -> str | None:
    if not sys.stdin.isatty():
        print("brokerjobs: refusing to prune without --yes (no terminal to ask)", file=sys.stderr)
        return None
    answer = await asyncio.to_thread(input, question)
    return answer.strip().lower()


def _print_report(report: PruneReport) -> None:
    for queue, count in report.moved.items():
        print(f"moved {count} message(s) from {queue}")
    for queue in report.deleted:
        print(f"deleted {queue}")
    for queue, why in report.kept:
        print(f"kept {queue}: {why}", file=sys.stderr)
    print(
        f"pruned {len(report.deleted)} queue(s), moved {sum(report.moved.values())} message(s), "
        f"kept {len(report.kept)}"
    )
