"""The scheduler's token session: one connection's token channel, the tokens held, what it knows.

The token is the schedules' state in one message of the single-active-consumer queue: only the
active consumer gets it, which makes that instance the leader (see ``scheduler``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime

from brokerjobs.broker.base import BrokerChannel as Channel
from brokerjobs.broker.base import BrokerConnection as Connection
from brokerjobs.envelope import CONTENT_TYPE, Delivery, OutgoingMessage
from brokerjobs.identity import process_identity
from brokerjobs.schedule import State, covers, decode_state, encode_state, merge_state

log = logging.getLogger("brokerjobs.scheduler")


class TokenSession:
    """One connection: the token channel, the tokens held, and what the leader knows."""

    def __init__(self, connection: Connection, channel: Channel, queue: str, wake: asyncio.Event):
        self.connection = connection
        self.channel = channel
        self.queue = queue
        self.wake = wake
        self.inbox: deque[Delivery] = deque()
        self.memory: State = {}
        self.held: list[Delivery] = []
        self.own_id: str | None = None  # our latest token, confirmed
        self.own_state: State = {}
        self.ready = False  # leading: our latest token came back, so we saw every older token
        self.last_persist = time.monotonic()
        self.persists = 0
        for future in (connection.lost, channel.closing, channel.consumer_cancelled):
            future.add_done_callback(lambda _: wake.set())

    async def on_delivery(self, delivery: Delivery) -> None:
        self.inbox.append(delivery)
        self.wake.set()

    def lost_reason(self) -> str | None:
        if self.connection.lost.done():
            return "connection closed"
        if self.channel.closing.done():
            return "channel closed"
        if self.channel.consumer_cancelled.done():
            return "consumer cancelled by the broker"
        return None

    async def on_token(self, token: Delivery) -> None:
        """Only the active consumer gets tokens: the first one makes this instance the leader.

        Tokens are acked only once a token that knows at least as much is confirmed in the
        queue. Before acting, the leader publishes its own token and waits until it comes back:
        every token queued ahead of it (a dead leader's newer one, a bootstrap twin) has then
        been merged.
        """
        merge_state(self.memory, decode_state(token.body))
        if token.message_id == self.own_id:
            self.held.append(token)
            if not self.ready:
                self.ready = True
                log.info("leading the schedules", extra={"action": "leader"})
        elif self.own_id is not None and covers(self.own_state, self.memory):
            await self.channel.ack(token.delivery_tag)  # a stale copy
        else:
            self.held.append(token)
            await self.persist()

    async def persist(self) -> None:
        """Publish a token with what we know, wait for the confirm, then ack the older ones."""
        message_id = uuid.uuid4().hex
        await self.publish_token(self.memory, message_id)
        self.own_id, self.own_state = message_id, dict(self.memory)
        for token in self.held:
            await self.channel.ack(token.delivery_tag)
        self.held = []
        self.last_persist = time.monotonic()
        self.persists += 1

    async def publish_token(self, state: Mapping[str, datetime], message_id: str) -> None:
        message = OutgoingMessage(
            body=encode_state(state),
            message_id=message_id,
            job_name=None,
            priority=0,
            headers={"bj-scheduler": process_identity()},
            timestamp=datetime.now(UTC),
            content_type=CONTENT_TYPE,
        )
        # Through the default exchange: straight to the scheduler queue, nowhere else.
        await self.channel.publish(message, "", self.queue)
