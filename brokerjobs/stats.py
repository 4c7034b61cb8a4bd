"""What an app's queues hold that AMQP cannot report: dead letters kept back by quorum queues.

A quorum queue with at-least-once dead-lettering (every brokerjobs quorum queue) keeps each
dead letter, e.g. a retry whose TTL expired, until the target queue confirmed it. After a
leader failover RabbitMQ 3.10 was measured to hold such retries for minutes (docs/deployment.md).
They are neither ready nor unacked, so ``queue.declare-ok``'s message count, and with it
``brokerjobs stats``, leaves them out; only the broker's own counter ``messages_dlx`` has them,
read by ``rabbitmqctl eval`` or the management API (``rabbitmqctl list_queues`` refuses the key).
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from brokerjobs.topology import TopologyPlan


def at_least_once_queues(topology: TopologyPlan) -> list[str]:
    """The app's queues that can hold dead letters out of their AMQP message count."""
    return [
        q.name
        for q in topology.queues
        if q.arguments.get("x-dead-letter-strategy") == "at-least-once"
    ]


def held_dead_letters_command(vhost: str) -> str:
    """The operator command that prints ``messages_dlx`` (dead letters held) of every queue."""
    escaped = vhost.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'rabbitmqctl eval \'rabbit_amqqueue:info_all(<<"{escaped}">>, '
        "[name, messages_ready, messages_dlx]).'"
    )


def held_dead_letters_note(topology: TopologyPlan, amqp_url: str) -> str | None:
    """What ``brokerjobs stats`` prints under its table when some queues are at-least-once."""
    if not at_least_once_queues(topology):
        return None
    path = urlsplit(amqp_url).path
    vhost = unquote(path[1:]) if len(path) > 1 else "/"
    return (
        "MESSAGES counts ready jobs only: quorum queues also hold dead letters waiting for an "
        "at-least-once confirm (e.g. retries whose delay is over), which AMQP cannot report. "
        f"See them (messages_dlx) with:\n  {held_dead_letters_command(vhost)}"
    )
