"""``brokerjobs topology diff|prune``: thin over ``topology_diff``, ``broker_queues`` and ``prune``.

When the broker's queues cannot be listed, both say so and fall back to passive-declaring the
names the app's naming scheme gives common delays: partial, but every name found is one the app
made, and prune deletes only when empty, so acting on it is as safe.

Exit codes: 0 done (``diff`` whatever it found; ``prune`` with nothing obsolete), 1 broker failure
or ``prune`` kept a queue (not empty without ``--drain``), 2 usage (or ``prune`` without ``--yes``
and no terminal to ask).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
from typing import Any

from brokerjobs.broker.amqp import connect
from brokerjobs.broker_queues import (
    ListingUnavailable,
    candidate_names,
    candidate_queues,
    list_queues,
)
from brokerjobs.prune import PruneReport, prune
from brokerjobs.settings import Settings
from brokerjobs.topology_diff import Obsolete, TopologyDiff, diff, with_depths

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_GUESSING = (
    "Guessing instead: asked for the plan's queues and the retry tiers that common delays "
    "(1s to 2h) would have made. Tiers of other delays and queues of removed handlers are not "
    "seen, and arguments are not compared."
)
_LISTING = (
    "The broker's queues are read from the management API when BROKERJOBS_MANAGEMENT_URL is set "
    "(http://user:password@host:15672), else from `rabbitmqctl list_queues` on the broker's host; "
    "failing both, common tier names are guessed (partial; it says so)."
)


def add_actions(actions: Any) -> None:
    """Add ``diff`` and ``prune`` to the ``topology`` subcommand's actions."""
    differ = actions.add_parser(
        "diff",
        help="what the broker has that the plan lacks, and what differs",
        description=textwrap.fill(
            "Compare the app's plan with the broker: obsolete queues (retry tiers of "
            "an older policy, queues of removed handlers) and planned queues whose arguments "
            "differ. " + _LISTING
        ),
        epilog="example:\n  brokerjobs topology diff shop.jobs:app",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    differ.add_argument("app", metavar="MODULE:APP", help="the app, e.g. shop.jobs:app")
    differ.add_argument("--json", action="store_true", help="print the diff as JSON")
    differ.set_defaults(handler=run_diff)
    pruner = actions.add_parser(
        "prune",
        help="delete obsolete queues (only when empty, or --drain them first)",
        description=textwrap.fill(
            "Delete the queues `topology diff` calls obsolete, each only if the broker "
            "finds it empty (queue.delete if-empty). --drain first moves an obsolete retry tier's "
            "messages to its main queue (publish with confirm, then ack). " + _LISTING
        ),
        epilog="examples:\n  brokerjobs topology prune shop.jobs:app\n"
        "  brokerjobs topology prune shop.jobs:app --drain --yes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pruner.add_argument("app", metavar="MODULE:APP", help="the app, e.g. shop.jobs:app")
    pruner.add_argument(
        "--drain", action="store_true", help="move messages to their main queue, then delete"
    )
    pruner.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    pruner.set_defaults(handler=run_prune)


async def compute(args: argparse.Namespace, settings: Settings) -> TopologyDiff:
    """The diff from the broker's full list, or from guessed names when it cannot be listed;
    the obsolete queues' depths are read live (listings lag, quorum queues' by seconds)."""
    from brokerjobs.cli import load_app

    app = load_app(args.app)
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


async def run_diff(args: argparse.Namespace, settings: Settings) -> int:
    found = await compute(args, settings)
    print(json.dumps(found.as_json(), indent=2) if args.json else found.describe())
    return EXIT_OK


async def run_prune(args: argparse.Namespace, settings: Settings) -> int:
    found = await compute(args, settings)
    if not found.obsolete:
        print("nothing obsolete: nothing to prune")
        return EXIT_OK
    print("\n".join(_intention(o, args.drain) for o in found.obsolete))
    if not args.yes:
        answer = await _ask(f"prune {len(found.obsolete)} queue(s)? [y/N] ")
        if answer is None:
            return EXIT_USAGE
        if answer not in ("y", "yes"):
            print("aborted: nothing pruned")
            return EXIT_OK
    connection = await connect(settings, "prune")
    try:
        report = await prune(connection, found.obsolete, drain=args.drain)
    finally:
        await connection.close()
    _print_report(report)
    return EXIT_OK if report.complete else EXIT_FAILED


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
