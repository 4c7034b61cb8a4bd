"""``brokerjobs stats`` (each queue's depth and consumers) and ``brokerjobs health`` (a probe)."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from brokerjobs.broker.base import BrokerConnection, QueueState
from brokerjobs.broker_queues import inspect_queues
from brokerjobs.cli_support import (
    CliError,
    Exit,
    app_argument,
    examples,
    load_app,
    run,
    start,
)
from brokerjobs.settings import Settings
from brokerjobs.topology import TopologyPlan


@click.command(
    short_help="depth and consumers of an app's queues",
    epilog=examples("brokerjobs stats shop.jobs:app", "brokerjobs stats shop.jobs:app --json"),
)
@app_argument
@click.option("--json", "as_json", is_flag=True, help="print the rows as a JSON array")
def stats(app: str, as_json: bool) -> int:
    """Show the depth (ready jobs) and consumers of each of an app's queues."""
    return run(_stats(app, start(), as_json))


async def _stats(path: str, settings: Settings, as_json: bool) -> int:
    from brokerjobs import cli_output
    from brokerjobs.broker.amqp import connect
    from brokerjobs.stats import held_dead_letters_note

    topology = load_app(path).topology()
    connection: BrokerConnection = await connect(settings, "stats")
    try:
        states = await inspect_queues(connection, [q.name for q in topology.queues])
    finally:
        await connection.close()
    rows = _rows(topology, states)
    if as_json:
        cli_output.print_json(rows)
        return Exit.OK
    columns = [("QUEUE", "left"), ("ROLE", "left"), ("MESSAGES", "right"), ("CONSUMERS", "right")]
    cells = [
        [r["queue"], r["role"], "(not declared)" if r.get("missing") else str(r["messages"]),
         "" if r.get("missing") else str(r["consumers"])]
        for r in rows
    ]  # fmt: skip
    cli_output.show(cli_output.table(columns, cells))
    note = held_dead_letters_note(topology, settings.amqp_url)
    if note:
        click.echo(note)
    return Exit.OK


def _rows(topology: TopologyPlan, states: dict[str, QueueState | None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for queue in topology.queues:
        state = states[queue.name]
        row: dict[str, Any] = {"queue": queue.name, "role": queue.role}
        if state is None:
            row["missing"] = True
        else:
            row.update(messages=state.messages, consumers=state.consumers)
        rows.append(row)
    return rows


@click.command(
    short_help="probe a worker's health endpoint (exit 0/1)",
    epilog=examples("brokerjobs health --port 8080", "brokerjobs health --port 8080 --live"),
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    help="the worker's health port [default: $BROKERJOBS_HEALTH_PORT]",
)
@click.option("--live", is_flag=True, help="probe /healthz (alive) instead of /readyz (ready)")
def health(port: int | None, live: bool) -> int:
    """Probe a running worker's health endpoint: exit 0 if it answers ok, else 1 (for exec
    probes and Docker's HEALTHCHECK)."""
    from brokerjobs.health import probe

    settings = start()
    port = port or settings.health_port
    if port is None:
        raise CliError("give --port or set BROKERJOBS_HEALTH_PORT", Exit.USAGE)
    path = "/healthz" if live else "/readyz"
    # Where the worker listens: loopback is one of a wildcard's addresses, not of any other.
    wildcard = settings.health_host in ("", "0.0.0.0", "::")
    host = "127.0.0.1" if wildcard else settings.health_host

    async def check() -> int:
        healthy = await asyncio.to_thread(probe, port, path, host)
        click.echo(f"{path}: {'ok' if healthy else 'FAILING'}")
        return Exit.OK if healthy else Exit.FAILURE

    return run(check())
