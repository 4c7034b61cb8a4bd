"""Which acks to send, coalesced: pure bookkeeping of one channel's delivery tags.

AMQP's ``basic.ack(multiple=true)`` settles every outstanding tag up to the one given. That is
only safe up to (not including) the lowest tag still being handled, so the batcher tracks the
tags delivered and not yet settled (at most the prefetch) and the acks waiting to be sent.
A tag must be registered as delivered before anything else may fail for it: an unregistered
tag below a multiple ack would be acked unseen.
"""

from __future__ import annotations


class AckBatcher:
    __slots__ = ("_pending", "_unsettled")

    def __init__(self) -> None:
        self._unsettled: set[int] = set()
        self._pending: list[int] = []

    def delivered(self, tag: int) -> None:
        self._unsettled.add(tag)

    def acked(self, tag: int) -> None:
        """An ack to send (soon, perhaps as part of a multiple ack)."""
        self._unsettled.discard(tag)
        self._pending.append(tag)

    def settled_otherwise(self, tag: int) -> None:
        """Nacked or rejected, sent on its own: it no longer holds back a multiple ack."""
        self._unsettled.discard(tag)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def take(self) -> list[tuple[int, bool]]:
        """The acks to send now, as (delivery tag, multiple), and forget them."""
        if not self._pending:
            return []
        floor = min(self._unsettled) if self._unsettled else None
        below = [t for t in self._pending if floor is None or t < floor]
        frames = [(max(below), len(below) > 1)] if below else []
        frames.extend((t, False) for t in self._pending if floor is not None and t > floor)
        self._pending = []
        return frames
