"""Removing obsolete queues safely: delete only if empty, or move their messages home first.

Deletion is ``queue.delete`` with ``if-empty``: the broker checks emptiness and deletes in one
step, so a message that arrives after we looked is never deleted with the queue (the delete
fails and the queue is kept). Draining is *get, publish a copy with confirm, then ack*, one
message at a time, to the planned main queue through the default exchange: a crash in between
duplicates a job, it never loses one. The copy drops ``expiration`` (kept in a header) and the
broker's ``x-death`` history, and keeps its attempt count.

Quorum queues refuse ``if-empty`` (3.10 closes the connection: "not supported by quorum queues"),
and a check of the depth followed by a plain delete could delete a job that arrived in between:
prune keeps them (after draining, with ``--drain``) and says how to delete them by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from brokerjobs.broker.base import BrokerConnection as Connection
from brokerjobs.envelope import BROKER_DEATH_HEADERS, Delivery, OutgoingMessage, copy_of
from brokerjobs.errors import TopologyError
from brokerjobs.topology import DEFAULT_EXCHANGE
from brokerjobs.topology_diff import Obsolete

log = logging.getLogger("brokerjobs.prune")
Deletion = Literal["deleted", "not-empty", "quorum"]  # quorum: the broker has no if-empty delete
# Old workers may still be retrying into a tier while it drains: give up after this many rounds.
_DRAIN_ROUNDS = 5


@dataclass
class PruneReport:
    deleted: list[str] = field(default_factory=list)
    moved: dict[str, int] = field(default_factory=dict)  # obsolete queue -> messages moved
    kept: list[tuple[str, str]] = field(default_factory=list)  # queue, why

    @property
    def complete(self) -> bool:
        return not self.kept


def drained_copy(delivery: Delivery) -> OutgoingMessage:
    """The message as its main queue should get it: same job, no death history, no TTL."""
    headers = {k: v for k, v in delivery.headers.items() if not k.startswith(BROKER_DEATH_HEADERS)}
    return copy_of(delivery, headers)


async def prune(
    connection: Connection, obsolete: Sequence[Obsolete], *, drain: bool
) -> PruneReport:
    """Delete each obsolete queue if it is empty; with ``drain``, move its messages first."""
    report = PruneReport()
    for found in obsolete:
        if drain and found.main is not None:
            await _drain_and_delete(connection, found, found.main, report)
            continue
        outcome = "quorum" if found.quorum else await delete_if_empty(connection, found.name)
        if outcome == "deleted":
            report.deleted.append(found.name)
        elif outcome == "quorum":
            report.kept.append((found.name, quorum_advice(found.name)))
        elif found.main is None:
            report.kept.append(
                (found.name, "holds messages (no planned queue can take them) or a consumer")
            )
        else:
            report.kept.append((found.name, "holds messages: use --drain to move them first"))
    return report


def quorum_advice(queue: str) -> str:
    return (
        "RabbitMQ cannot delete a quorum queue only if it is empty (no if-empty delete), so "
        "prune keeps it: once no worker runs the old policy, check that it is empty "
        f"(`brokerjobs topology diff`) and delete it with `rabbitmqctl delete_queue {queue}`"
    )


async def _drain_and_delete(
    connection: Connection, found: Obsolete, main: str, report: PruneReport
) -> None:
    queue = found.name
    for _ in range(_DRAIN_ROUNDS):
        report.moved[queue] = report.moved.get(queue, 0) + await move_messages(
            connection, queue, main
        )
        outcome = "quorum" if found.quorum else await delete_if_empty(connection, queue)
        if outcome == "deleted":
            report.deleted.append(queue)
            return
        if outcome == "quorum":
            report.kept.append((queue, "drained, but " + quorum_advice(queue)))
            return
    report.kept.append((queue, f"messages kept arriving while it drained ({_DRAIN_ROUNDS} rounds)"))


async def move_messages(connection: Connection, queue: str, main: str) -> int:
    """Move every message now in ``queue`` to ``main``: the count moved."""
    channel = await connection.channel(confirms=True)
    moved = 0
    try:
        while (delivery := await channel.get(queue)) is not None:
            # publish raises (unroutable, nacked, lost) before the ack: the original stays.
            await channel.publish(drained_copy(delivery), DEFAULT_EXCHANGE, main)
            await channel.ack(delivery.delivery_tag)
            moved += 1
        await channel.flush_acks()
    finally:
        await channel.close()
    if moved:
        log.info("moved %d message(s) from %s to %s", moved, queue, main)
    return moved


async def delete_if_empty(connection: Connection, queue: str) -> Deletion:
    """Delete ``queue`` only if the broker finds it empty, in one step (never a message lost).

    Never for a quorum queue: RabbitMQ answers if-empty on one by closing the whole connection.
    """
    channel = await connection.channel(confirms=False)
    try:
        # if-unused too: a consumer still on a removed handler's queue means a worker uses it.
        await channel.delete_queue(queue, if_empty=True, if_unused=True)
    except TopologyError:  # PRECONDITION_FAILED (not empty, or in use) closed the channel
        return "not-empty"
    await channel.close()
    return "deleted"
