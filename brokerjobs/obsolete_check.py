"""The worker's start-up warning about obsolete queues (older retry tiers) that still hold jobs.

It runs once per worker, in the background on its first session's connection once that consumes
(no connection of its own, nothing delays consuming), and it only warns: a failure to check is
logged at DEBUG. The broker's queues come from the management API when
``BROKERJOBS_MANAGEMENT_URL`` is set; otherwise the tiers that common delays would have made are
passive-declared (bounded and best effort: ``brokerjobs topology diff`` sees them all).
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from typing import Protocol

from brokerjobs.app import App
from brokerjobs.broker.base import BrokerConnection as Connection
from brokerjobs.broker_queues import (
    MANAGEMENT_ENV,
    candidate_names,
    candidate_queues,
    list_queues,
)
from brokerjobs.settings import Settings
from brokerjobs.topology import TopologyPlan
from brokerjobs.topology_diff import Obsolete, diff

log = logging.getLogger("brokerjobs.worker")
_checked: weakref.WeakSet[object] = weakref.WeakSet()  # the workers already checked
_running: set[asyncio.Task[None]] = set()  # strong references to the background checks


class _Worker(Protocol):
    app: App
    settings: Settings
    topology: TopologyPlan


def after_start(worker: _Worker, connection: Connection) -> None:
    """Once per ``worker``, when its first session consumes: check in the background on it."""
    if worker in _checked:
        return
    _checked.add(worker)
    task = asyncio.create_task(
        _check_quietly(connection, worker.topology, worker.app.name, worker.settings.amqp_url)
    )
    _running.add(task)
    task.add_done_callback(_running.discard)


async def _check_quietly(
    connection: Connection, topology: TopologyPlan, app_name: str, amqp_url: str
) -> None:
    try:
        for found in await holding(connection, topology, app_name, amqp_url):
            log.warning(message(found))
    except Exception as exc:  # e.g. the session ended first: a warning is not worth more
        log.debug("could not check for obsolete queues: %s", exc)


async def holding(
    connection: Connection, topology: TopologyPlan, app_name: str, amqp_url: str
) -> list[Obsolete]:
    """The app's obsolete queues that hold messages (depths read live)."""
    if os.environ.get(MANAGEMENT_ENV):
        listed = await list_queues(amqp_url)  # the management API only, never rabbitmqctl here
        names = [o.name for o in diff(topology, listed, app_name).obsolete]
    else:
        names = candidate_names(topology)
    queues = await candidate_queues(connection, names)
    return [o for o in diff(topology, queues, app_name).obsolete if o.queue.messages]


def message(found: Obsolete) -> str:
    held = f"obsolete queue {found.name} holds {found.queue.messages} job(s) ({found.why})"
    if found.main is None:
        return f"{held}: no worker consumes them; see `brokerjobs topology diff MODULE:APP`"
    return (
        f"{held}: they return to {found.main} when their delay ends; move them now and delete "
        "the tier with `brokerjobs topology prune MODULE:APP --drain`"
    )
