"""Reading the broker's list of queues, which AMQP 0-9-1 cannot do.

AMQP has no "list queues": a client can only ask about a name it already knows (passive
declare). Guessing names is not enough here, since an older retry policy may have used any tier
label. So the list comes from the broker's own tools, in this order:

1. the management HTTP API, when ``BROKERJOBS_MANAGEMENT_URL`` is set
   (``http://user:password@host:15672``; without credentials, the AMQP URL's are used);
2. ``rabbitmqctl list_queues``, when it is on PATH and the AMQP URL points at this host;
3. otherwise ``ListingUnavailable``, naming both ways.

``candidate_queues`` is the bounded, best-effort alternative for the worker's start-up warning:
passive-declare the tier labels of common delays.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from brokerjobs.broker.base import BrokerChannel, QueueState
from brokerjobs.broker.base import BrokerConnection as Connection
from brokerjobs.errors import BrokerJobsError, TopologyError
from brokerjobs.retry import DEFAULT_DELAYS, tier_label
from brokerjobs.topology import TopologyPlan, retry_queue_name
from brokerjobs.topology_diff import BrokerQueue

MANAGEMENT_ENV = "BROKERJOBS_MANAGEMENT_URL"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
_DEFAULT_PORTS = (5672, 5671)
_COMMON_DELAYS = (1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600, 900, 1800, 3600, 7200)
_TIMEOUT_S = 30.0


class ListingUnavailable(BrokerJobsError):
    """The broker's queues cannot be listed from here (no management URL, no local rabbitmqctl)."""


def vhost_of(amqp_url: str) -> str:
    path = urlsplit(amqp_url.split(",")[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def list_queues(amqp_url: str, environ: dict[str, str] | None = None) -> list[BrokerQueue]:
    """Every queue of the AMQP URL's vhost, with its arguments and depth."""
    env = os.environ if environ is None else environ
    management = env.get(MANAGEMENT_ENV)
    if management:
        return await asyncio.to_thread(_from_management, management, amqp_url)
    parts = urlsplit(amqp_url.split(",")[0])
    host = parts.hostname or "localhost"
    rabbitmqctl = shutil.which("rabbitmqctl")
    # rabbitmqctl speaks to this host's default node, which is the URL's broker only if the URL
    # names this host and the default port (a node beside it on another port is not the same).
    local = host in _LOCAL_HOSTS and (parts.port or 5672) in _DEFAULT_PORTS
    if rabbitmqctl and local:
        return await _from_rabbitmqctl(rabbitmqctl, vhost_of(amqp_url))
    why = "rabbitmqctl is not on PATH" if not rabbitmqctl else f"the broker ({host}) is not local"
    if rabbitmqctl and host in _LOCAL_HOSTS:
        why = f"rabbitmqctl reaches the node on port 5672, not {parts.port}"
    raise ListingUnavailable(
        "cannot list the broker's queues: AMQP has no way to, and "
        f"{why}. Set {MANAGEMENT_ENV}=http://user:password@{host}:15672 (the management "
        "plugin), or run this on the broker's host where `rabbitmqctl list_queues` works"
    )


def parse_rabbitmqctl(text: str) -> list[BrokerQueue]:
    """``rabbitmqctl list_queues name arguments messages --formatter json`` output."""
    return [
        BrokerQueue(row["name"], int(row.get("messages") or 0), _arguments(row.get("arguments")))
        for row in json.loads(text or "[]")
    ]


def parse_management(rows: list[dict[str, Any]]) -> list[BrokerQueue]:
    """``GET /api/queues/<vhost>`` rows (``messages`` lags a few seconds behind)."""
    return [
        BrokerQueue(row["name"], int(row.get("messages") or 0), _arguments(row.get("arguments")))
        for row in rows
    ]


def _arguments(raw: Any) -> dict[str, Any]:
    # rabbitmqctl 3.x prints [[name, type, value], ...]; the API and newer versions a mapping.
    if isinstance(raw, dict):
        return dict(raw)
    return {item[0]: item[-1] for item in raw or []}


async def _from_rabbitmqctl(command: str, vhost: str) -> list[BrokerQueue]:
    args = ["list_queues", "-q", "-p", vhost, "name", "arguments", "messages"]
    process = await asyncio.create_subprocess_exec(
        command,
        *args,
        "--formatter",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), _TIMEOUT_S)
    if process.returncode != 0:
        raise ListingUnavailable(
            f"`rabbitmqctl list_queues -p {vhost}` failed ({process.returncode}): "
            f"{err.decode(errors='replace').strip()[:500]}; set {MANAGEMENT_ENV} instead"
        )
    return parse_rabbitmqctl(out.decode())


def _from_management(base: str, amqp_url: str) -> list[BrokerQueue]:
    import urllib.request  # only here: it costs every other command's start-up

    parts, amqp = urlsplit(base), urlsplit(amqp_url.split(",")[0])
    user = unquote(parts.username or amqp.username or "guest")
    password = unquote(parts.password or amqp.password or "guest")
    netloc = parts.hostname or "localhost"
    if parts.port:
        netloc += f":{parts.port}"
    url = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}/api/queues/" + quote(
        vhost_of(amqp_url), safe=""
    )
    request = urllib.request.Request(f"{url}?columns=name,arguments,messages")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            rows = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise ListingUnavailable(
            f"the management API at {parts.scheme}://{netloc} did not list the queues: {exc}"
        ) from None
    return parse_management(rows)


def candidate_names(topology: TopologyPlan) -> list[str]:
    """Tier names that common delays would give each main queue, minus the planned ones."""
    planned = {q.name for q in topology.queues}
    delays = {tier_label(d): float(d) for d in (*DEFAULT_DELAYS, *_COMMON_DELAYS)}.values()
    return [
        name
        for main in topology.main_queues
        for delay in delays
        if (name := retry_queue_name(main.name, delay)) not in planned
    ]


async def candidate_queues(connection: Connection, names: Iterable[str]) -> list[BrokerQueue]:
    """Passive-declare ``names``: the ones that exist, depth only (arguments unknown)."""
    states = await inspect_queues(connection, names)
    return [BrokerQueue(name, state.messages) for name, state in states.items() if state]


async def inspect_queues(
    connection: Connection, names: Iterable[str]
) -> dict[str, QueueState | None]:
    """Each queue's live depth and consumers, or None where it does not exist.

    A passive declare of a missing queue ends its channel (AMQP's 404), so the next name goes
    to a fresh channel whenever the last one is closed: one short channel per missing queue.
    """
    states: dict[str, QueueState | None] = {}
    channel: BrokerChannel | None = None
    try:
        for name in names:
            if channel is None or channel.is_closed:
                channel = await connection.channel(confirms=False)
            states[name] = await _inspect(channel, name)
    finally:
        if channel is not None:
            await channel.close()
    return states


async def _inspect(channel: BrokerChannel, name: str) -> QueueState | None:
    try:
        return await channel.inspect_queue(name)
    except TopologyError:  # the queue does not exist
        return None
