"""Publisher retries: only unconfirmed messages are sent again, with the same job id."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from brokerjobs import Publisher, UnroutableJob, job
from brokerjobs.envelope import OutgoingMessage
from brokerjobs.errors import PublishError, PublishInterrupted, PublishNacked
from brokerjobs.settings import load_settings


@job("note.add")
class AddNote(BaseModel):
    n: int


class FlakyChannel:
    """Refuses the first try of chosen messages (by body), the way a failing broker node would."""

    def __init__(self, refuse: dict[int, type[PublishError]]) -> None:
        self.refuse = dict(refuse)
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        n = int(message.body.split(b":")[1].strip(b"}"))
        self.sent.append((message.message_id, message.body))
        error = self.refuse.pop(n, None)
        if error is not None:
            raise error(f"refused {n}")

    async def publish_many(
        self, messages: Any, window: int, around: Any = None
    ) -> list[tuple[OutgoingMessage, PublishError]]:
        failed = []
        for message, exchange, key in messages:
            try:
                await self.publish(message, exchange, key)
            except PublishError as exc:
                failed.append((message, exc))
        return failed

    async def ack(self, delivery_tag: int) -> None: ...

    async def nack(self, delivery_tag: int, *, requeue: bool) -> None: ...


def publisher(channel: FlakyChannel, attempts: int = 5) -> Publisher:
    return Publisher(load_settings(), exchange="x", channel=channel, attempts=attempts)


async def test_a_nacked_batch_member_is_republished_alone_with_the_same_id() -> None:
    channel = FlakyChannel({2: PublishNacked, 4: PublishInterrupted})
    ids = await publisher(channel).publish_many(AddNote(n=n) for n in range(5))
    bodies = [body for _, body in channel.sent]
    assert bodies[:5] == [f'{{"n":{n}}}'.encode() for n in range(5)]
    assert sorted(bodies[5:]) == [b'{"n":2}', b'{"n":4}']
    resent_ids = {message_id for message_id, _ in channel.sent[5:]}
    assert resent_ids == {ids[2], ids[4]}


async def test_a_single_publish_gives_up_after_its_attempts() -> None:
    class AlwaysNack(FlakyChannel):
        async def publish(self, message: OutgoingMessage, exchange: str, key: str) -> None:
            self.sent.append((message.message_id, message.body))
            raise PublishNacked("node down")

    channel = AlwaysNack({})
    with pytest.raises(PublishNacked, match="node down"):
        await publisher(channel, attempts=3).publish(AddNote(n=1))
    assert len(channel.sent) == 3
    assert len({message_id for message_id, _ in channel.sent}) == 1


async def test_unroutable_is_never_retried() -> None:
    channel = FlakyChannel({0: UnroutableJob, 1: UnroutableJob})
    with pytest.raises(UnroutableJob):
        await publisher(channel).publish_many([AddNote(n=0), AddNote(n=1)])
    assert len(channel.sent) == 2
