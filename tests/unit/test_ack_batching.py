"""Coalesced acks: one multiple ack up to the lowest tag still handled, single acks above it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from brokerjobs.ack_batching import AckBatcher


def batcher(delivered: range) -> AckBatcher:
    acks = AckBatcher()
    for tag in delivered:
        acks.delivered(tag)
    return acks


def test_contiguous_acks_become_one_multiple_ack() -> None:
    acks = batcher(range(1, 6))
    for tag in (2, 1, 3, 4, 5):
        acks.acked(tag)
    assert acks.take() == [(5, True)]
    assert acks.take() == []


def test_a_tag_still_being_handled_holds_back_the_multiple_ack() -> None:
    acks = batcher(range(1, 6))
    for tag in (1, 2, 4, 5):
        acks.acked(tag)
    assert acks.take() == [(2, True), (4, False), (5, False)]
    acks.acked(3)
    assert acks.take() == [(3, False)]


def test_a_nacked_tag_does_not_hold_back_later_acks() -> None:
    acks = batcher(range(1, 4))
    acks.settled_otherwise(1)
    acks.acked(2)
    acks.acked(3)
    assert acks.take() == [(3, True)]


@given(st.permutations(list(range(1, 30))), st.integers(0, 29), st.data())
def test_every_tag_is_acked_exactly_once_and_never_one_still_handled(
    order: list[int], cut: int, data: st.DataObject
) -> None:
    acks = batcher(range(1, 30))
    covered: list[int] = []
    unsettled = set(range(1, 30))
    for step, tag in enumerate(order):
        acks.acked(tag)
        unsettled.discard(tag)
        if step == cut or data.draw(st.booleans()):
            for sent, multiple in acks.take():
                newly = [t for t in range(1, sent + 1) if t not in covered] if multiple else [sent]
                assert not set(newly) & unsettled  # never acks a job still being handled
                assert multiple or sent not in covered  # a single ack of an acked tag fails
                covered.extend(t for t in newly if t not in covered)
    for sent, multiple in acks.take():
        covered.extend(
            t for t in ([sent] if not multiple else range(1, sent + 1)) if t not in covered
        )
    assert sorted(covered) == list(range(1, 30))
