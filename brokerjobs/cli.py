"""The ``brokerjobs`` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from brokerjobs import __version__, parking_cli, publish_cli, topology_cli
from brokerjobs.app import App
from brokerjobs.broker.amqp import connect
from brokerjobs.errors import BrokerJobsError, TopologyError
from brokerjobs.health import probe
from brokerjobs.logs import configure_logging
from brokerjobs.provision import declare
from brokerjobs.settings import Settings, load_settings
from brokerjobs.stats import held_dead_letters_note
from brokerjobs.telemetry import configure_from_environment
from brokerjobs.worker import run_worker

log = logging.getLogger("brokerjobs.cli")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def load_app(path: str) -> App:
    """Import ``module:attribute`` and check that it is an App; errors say how to fix it."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise BrokerJobsError(f"expected MODULE:APP (e.g. myservice.jobs:app), got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BrokerJobsError(
            f"cannot import {module_name!r}: {exc}. Run brokerjobs from the directory that "
            f"contains it, or add that directory to PYTHONPATH (current directory: {os.getcwd()})"
        ) from None
    app = getattr(module, attribute, None)
    if isinstance(app, App):
        return app
    apps = sorted(name for name, value in vars(module).items() if isinstance(value, App))
    found = f"; its apps: {', '.join(apps)}" if apps else "; it defines no brokerjobs App"
    if not hasattr(module, attribute):
        raise BrokerJobsError(f"module {module_name!r} has no attribute {attribute!r}{found}")
    raise BrokerJobsError(f"{path!r} is a {type(app).__name__}, not a brokerjobs App{found}")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        url=getattr(args, "url", None),
        prefetch=getattr(args, "prefetch", None),
        log_format=getattr(args, "log_format", None),
    )


async def _cmd_worker(args: argparse.Namespace) -> int:
    app, settings = load_app(args.app), _settings(args)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    if args.processes < 1:
        raise BrokerJobsError(f"--processes must be at least 1, got {args.processes}")
    if args.processes > 1:
        from brokerjobs.supervisor import run_supervisor

        app.select_queues(queues)  # a wrong queue name fails here, not in N children
        passed = ["--queues", args.queues] if args.queues else []
        if args.prefetch:
            passed += ["--prefetch", str(args.prefetch)]
        return await run_supervisor(args.app, args.processes, settings, passed)
    if configure_from_environment(os.environ):
        log.info("exporting traces and metrics over OTLP")
    await run_worker(app, settings, queues)
    return EXIT_OK


async def _cmd_scheduler(args: argparse.Namespace) -> int:
    from brokerjobs.scheduler import run_scheduler

    await run_scheduler(load_app(args.app), _settings(args))
    return EXIT_OK


async def _cmd_topology(args: argparse.Namespace) -> int:
    topology = load_app(args.app).topology()
    if args.action == "show":
        print(topology.describe())
        return EXIT_OK
    settings = _settings(args)
    connection = await connect(settings, "topology")
    try:
        await declare(connection, topology)
    finally:
        await connection.close()
    print(f"declared exchange {topology.exchange} and {len(topology.queues)} queues")
    return EXIT_OK


async def _cmd_health(args: argparse.Namespace) -> int:
    port = args.port or load_settings().health_port
    if port is None:
        print("brokerjobs: give --port or set BROKERJOBS_HEALTH_PORT", file=sys.stderr)
        return EXIT_USAGE
    path = "/healthz" if args.live else "/readyz"
    healthy = await asyncio.to_thread(probe, port, path)
    print(f"{path}: {'ok' if healthy else 'FAILING'}")
    return EXIT_OK if healthy else EXIT_FAILURE


async def _cmd_stats(args: argparse.Namespace) -> int:
    topology = load_app(args.app).topology()
    connection = await connect(_settings(args), "stats")
    rows: list[dict[str, Any]] = []
    try:
        channel = await connection.channel(confirms=False)
        for queue in topology.queues:
            try:
                state = await channel.inspect_queue(queue.name)
            except TopologyError:
                channel = await connection.channel(confirms=False)
                rows.append({"queue": queue.name, "role": queue.role, "missing": True})
                continue
            rows.append(
                {
                    "queue": queue.name,
                    "role": queue.role,
                    "messages": state.messages,
                    "consumers": state.consumers,
                }
            )
    finally:
        await connection.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'QUEUE':<50} {'ROLE':<8} {'MESSAGES':>9} {'CONSUMERS':>9}")
        for row in rows:
            if row.get("missing"):
                print(f"{row['queue']:<50} {row['role']:<8} {'(not declared)':>19}")
            else:
                print(
                    f"{row['queue']:<50} {row['role']:<8} "
                    f"{row['messages']:>9} {row['consumers']:>9}"
                )
        note = held_dead_letters_note(topology, _settings(args).amqp_url)
        if note:
            print(note)
    return EXIT_OK


def _add_topology(commands: Any) -> None:
    topology = commands.add_parser(
        "topology", help="show, declare, diff or prune the exchanges and queues"
    )
    actions = topology.add_subparsers(dest="action", required=True)
    for action, help_text in [("show", "print the plan"), ("declare", "apply the plan")]:
        parser = actions.add_parser(action, help=help_text)
        parser.add_argument("app", metavar="MODULE:APP", help="the app, e.g. shop.jobs:app")
        parser.set_defaults(handler=_cmd_topology)
    topology_cli.add_actions(actions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brokerjobs",
        description="Run, inspect and repair brokerjobs apps: workers, the scheduler, the "
        "topology, queue stats, and parked jobs.",
        epilog="Settings come from BROKERJOBS_* environment variables (see the README). "
        "Exit codes: 0 done, 1 failure (broker, publish), 2 usage, 3 queue not found, "
        "4 nothing matched (replay/purge).",
    )
    parser.add_argument("--version", action="version", version=f"brokerjobs {__version__}")
    parser.add_argument("--url", help="AMQP URL (default: $BROKERJOBS_URL)")
    parser.add_argument("--log-format", choices=["text", "json"])
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run an app's handlers")
    worker.add_argument("app", metavar="MODULE:APP")
    worker.add_argument("--prefetch", type=int, help="concurrent jobs per queue")
    worker.add_argument(
        "--queues", metavar="Q1,Q2", help="consume only these of the app's queues (comma-separated)"
    )
    worker.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="run N worker processes under a supervisor (default 1: this process)",
    )
    worker.set_defaults(handler=_cmd_worker)

    scheduler = commands.add_parser("scheduler", help="publish an app's scheduled jobs")
    scheduler.add_argument("app", metavar="MODULE:APP")
    scheduler.set_defaults(handler=_cmd_scheduler)

    _add_topology(commands)

    health = commands.add_parser("health", help="probe a worker's health endpoint (exit 0/1)")
    health.add_argument("--port", type=int, help="default: $BROKERJOBS_HEALTH_PORT")
    health.add_argument("--live", action="store_true", help="/healthz instead of /readyz")
    health.set_defaults(handler=_cmd_health)

    stats = commands.add_parser("stats", help="depth and consumers of an app's queues")
    stats.add_argument("app", metavar="MODULE:APP")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(handler=_cmd_stats)

    parking_cli.add_parser(commands)
    publish_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except BrokerJobsError as exc:
        print(f"brokerjobs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_format, settings.log_level)
    if "." not in sys.path and "" not in sys.path:
        sys.path.insert(0, "")  # MODULE:APP resolves from the current directory, like uvicorn
    handler: Callable[..., Any] = args.handler
    try:
        if args.command in ("parked", "publish") or getattr(args, "action", None) in (
            "diff",
            "prune",
        ):
            return int(asyncio.run(handler(args, settings)))
        return int(asyncio.run(handler(args)))
    except BrokerJobsError as exc:
        print(f"brokerjobs: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
