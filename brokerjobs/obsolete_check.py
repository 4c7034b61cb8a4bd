"""The worker's start-up warning about obsolete queues (older retry tiers) that still hold jobs.

It runs in the background on its own connection, so it never delays consuming, and it only
warns: a failure to check is logged at DEBUG. The broker's queues come from the management API
when ``BROKERJOBS_MANAGEMENT_URL`` is set; otherwise the tiers that common delays would have
made are passive-declared (bounded and best effort: ``brokerjobs topology diff`` sees them all).
"""

from __future__ import annotations

import asyncio
import logging
import os

from brokerjobs.broker_queues import (
    MANAGEMENT_ENV,
    candidate_names,
    candidate_queues,
    list_queues,
)
from brokerjobs.settings import Settings
from brokerjobs.topology import TopologyPlan
from brokerjobs.topology_diff import Obsolete, diff
from brokerjobs.transport import connect

log = logging.getLogger("brokerjobs.worker")


def start(settings: Settings, topology: TopologyPlan, app_name: str) -> asyncio.Task[None]:
    """Check in the background; cancel the task when the worker stops."""
    return asyncio.create_task(_check_quietly(settings, topology, app_name))


async def _check_quietly(settings: Settings, topology: TopologyPlan, app_name: str) -> None:
    try:
        for found in await holding(settings, topology, app_name):
            log.warning(message(found))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.debug("could not check for obsolete queues: %s", exc)


async def holding(settings: Settings, topology: TopologyPlan, app_name: str) -> list[Obsolete]:
    """The app's obsolete queues that hold messages."""
    if os.environ.get(MANAGEMENT_ENV):
        queues = await list_queues(settings.amqp_url)
    else:
        connection = await connect(settings, "worker-checks")
        try:
            queues = await candidate_queues(connection, candidate_names(topology))
        finally:
            await connection.close()
    return [o for o in diff(topology, queues, app_name).obsolete if o.queue.messages]


def message(found: Obsolete) -> str:
    held = f"obsolete queue {found.name} holds {found.queue.messages} job(s) ({found.why})"
    if found.main is None:
        return f"{held}: no worker consumes them; see `brokerjobs topology diff MODULE:APP`"
    return (
        f"{held}: they return to {found.main} when their delay ends; move them now and delete "
        "the tier with `brokerjobs topology prune MODULE:APP --drain`"
    )
