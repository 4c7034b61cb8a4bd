"""``brokerjobs topology diff|prune``: thin over ``topology_diff``, ``broker_queues`` and ``prune``.

Exit codes: 0 done (``diff`` whatever it found; ``prune`` with nothing obsolete), 1 broker failure,
the queues cannot be listed, or ``prune`` kept a queue (not empty without ``--drain``), 2 usage
(or ``prune`` without ``--yes`` and no terminal to ask).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
from typing import Any

from brokerjobs.broker_queues import ListingUnavailable, list_queues
from brokerjobs.prune import PruneReport, prune
from brokerjobs.settings import Settings
from brokerjobs.topology_diff import Obsolete, TopologyDiff, diff
from brokerjobs.transport import connect

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_LISTING = (
    "The broker's queues are read from the management API when BROKERJOBS_MANAGEMENT_URL is set "
    "(http://user:password@host:15672), else from `rabbitmqctl list_queues` on the broker's host."
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
    from brokerjobs.cli import load_app

    app = load_app(args.app)
    return diff(app.topology(), await list_queues(settings.amqp_url), app.name)


async def run_diff(args: argparse.Namespace, settings: Settings) -> int:
    try:
        found = await compute(args, settings)
    except ListingUnavailable as exc:
        print(f"brokerjobs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(found.as_json(), indent=2) if args.json else found.describe())
    return EXIT_OK


async def run_prune(args: argparse.Namespace, settings: Settings) -> int:
    try:
        found = await compute(args, settings)
    except ListingUnavailable as exc:
        print(f"brokerjobs: {exc}", file=sys.stderr)
        return EXIT_FAILED
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
    if drain and found.main is not None and held:
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
