"""Settlement: publish-then-ack, and what happens when the broker nacks the copy."""

from __future__ import annotations

from typing import Any

import pytest

from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.errors import PublishNacked
from brokerjobs.retry import Failure, FailureKind, Retry, RetryPolicy
from brokerjobs.settlement import Settlement
from brokerjobs.telemetry import Telemetry


class NackingChannel:
    def __init__(self, nacks: int) -> None:
        self.nacks = nacks
        self.log: list[str] = []

    async def publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        if self.nacks:
            self.nacks -= 1
            self.log.append(f"nack {routing_key}")
            raise PublishNacked("no leader")
        self.log.append(f"confirm {routing_key}")

    async def publish_many(self, messages: Any, window: int, around: Any = None) -> list[Any]:
        raise NotImplementedError

    async def ack(self, delivery_tag: int) -> None:
        self.log.append(f"ack {delivery_tag}")

    async def nack(self, delivery_tag: int, *, requeue: bool) -> None:
        self.log.append(f"nack-delivery {delivery_tag}")


def delivery() -> Delivery:
    return Delivery(
        body=b"{}", delivery_tag=7, exchange="x", routing_key="k", redelivered=False,
        message_id="m1", job_name="k",
    )  # fmt: skip


ERROR = Failure(FailureKind.ERROR, "boom")


async def test_a_nacked_retry_copy_is_published_again_before_the_original_is_acked() -> None:
    channel = NackingChannel(nacks=2)
    settlement = Settlement(channel, "q", Telemetry.off())
    decision = await settlement.failed(delivery(), RetryPolicy(delays=(1.0,)), ERROR)
    assert decision == Retry(1.0)
    assert channel.log == ["nack q.retry.1s", "nack q.retry.1s", "confirm q.retry.1s", "ack 7"]


async def test_a_copy_that_is_never_confirmed_leaves_the_original_unacked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("brokerjobs.settlement.NACK_RETRY_S", 0.3)
    channel = NackingChannel(nacks=10_000)
    settlement = Settlement(channel, "q", Telemetry.off())
    with pytest.raises(PublishNacked):
        await settlement.failed(delivery(), RetryPolicy(delays=(1.0,), max_attempts=1), ERROR)
    assert all(entry.startswith("nack q.parked") for entry in channel.log)
    assert "ack 7" not in channel.log


def test_a_parked_job_names_the_trace_of_its_first_publish() -> None:
    from brokerjobs.retry import Park
    from brokerjobs.settlement import parked_message

    first = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    traced = delivery()
    traced.headers = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
                      "bj-original-traceparent": first}  # fmt: skip
    parked = parked_message(traced, "q", ERROR, Park("boom"))
    assert parked.headers["bj-trace-id"] == "0af7651916cd43dd8448eb211c80319c"
    assert "bj-trace-id" not in parked_message(delivery(), "q", ERROR, Park("boom")).headers
