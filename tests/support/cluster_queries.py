"""Questions to a running cluster (``tests.support.cluster``): which node leads a quorum queue,
its members' Raft state, and counters that ``list_queues`` does not show.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from tests.support.cluster import Node, RabbitCluster
from tests.support.cluster_processes import ClusterError


def leader(cluster: RabbitCluster, queue: str, via: Node) -> Node:
    """The node that currently leads quorum queue ``queue``."""
    rows = cluster.ctl_json(via, "list_queues", "name", "leader")
    for row in rows:
        if row.get("name") == queue and row.get("leader"):
            return cluster.node_by_name(str(row["leader"]))
    raise ClusterError(f"queue {queue!r} has no leader in {rows!r}")


def quorum_status(cluster: RabbitCluster, queue: str, via: Node) -> list[dict[str, Any]]:
    """Per member: node, Raft state, log and commit index (rabbitmq-queues quorum_status)."""
    rows = cluster.ctl_json(via, "quorum_status", queue, tool="rabbitmq-queues")
    return [{_norm(k): v for k, v in row.items()} for row in rows]


def fifo_overview(cluster: RabbitCluster, queue: str, via: Node) -> dict[str, int]:
    """Counts from the quorum queue's state machine on ``via``, including dead letters that
    wait for an at-least-once dead-letter confirm (not part of ``list_queues messages``)."""
    keys = (
        "num_messages",
        "num_ready_messages",
        "num_checked_out",
        "num_discarded",
        "num_discard_checked_out",
    )
    expr = (
        f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)), '
        "{RaName, _} = amqqueue:get_pid(Q), "
        "{ok, {_, O}, _} = ra:local_query({RaName, node()}, fun rabbit_fifo:overview/1), "
        f'io:format("~w~n", [[maps:get(K, O, -1) || K <- [{",".join(keys)}]]]).'
    )
    output = cluster.ctl(via, "eval", expr)
    numbers = re.findall(r"-?\d+", output.splitlines()[0] if output else "")
    return dict(zip(keys, map(int, numbers), strict=False))


def queue_counters(
    cluster: RabbitCluster, queues: Sequence[str], via: Node
) -> dict[str, dict[str, int]]:
    """Per quorum queue: messages, ready, unacked and ``messages_dlx`` (dead letters held for
    an at-least-once dead-letter confirm, which AMQP's declare-ok never counts). Read with
    ``rabbit_amqqueue:info`` because ``rabbitmqctl list_queues`` (3.10) refuses the key.
    A queue that does not answer (no leader) is left out."""
    keys = ("messages", "messages_ready", "messages_unacknowledged", "messages_dlx")
    names = ", ".join(f'<<"{q}">>' for q in queues)
    expr = (
        '[try {ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, N)), '
        f"Info = rabbit_amqqueue:info(Q, [{','.join(keys)}]), "
        'io:format("~s ~w~n", [N, [V || {_, V} <- Info]]) '
        f"catch _:_ -> ok end || N <- [{names}]], ok."
    )
    counters: dict[str, dict[str, int]] = {}
    for line in cluster.ctl(via, "eval", expr, timeout=20).splitlines():
        name, _, values = line.partition(" ")
        numbers = [int(n) for n in re.findall(r"-?\d+", values)]
        if len(numbers) == len(keys):
            counters[name] = dict(zip(keys, numbers, strict=True))
    return counters


def wait_caught_up(
    cluster: RabbitCluster, queues: Sequence[str], via: Node, timeout: float = 60.0
) -> None:
    """Wait until every queue has all members online and all commit indexes equal."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            if all(_caught_up(cluster, q, via) for q in queues):
                return
        except ClusterError as exc:  # a member may still be starting
            last = exc
        if time.monotonic() > deadline:
            raise ClusterError(f"quorum replicas did not catch up within {timeout:g}s: {last}")
        time.sleep(0.5)


def _caught_up(cluster: RabbitCluster, queue: str, via: Node) -> bool:
    members = quorum_status(cluster, queue, via)
    states = {str(m.get("raft_state")) for m in members}
    commits = {m.get("commit_index") for m in members}
    if len(members) != len(cluster.nodes) or not states <= {"leader", "follower"}:
        return False
    return "leader" in states and len(commits) == 1


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")
