"""A job whose headers nearly fill one frame arrives fine, but its retry or parking copy (the
same headers plus the failure envelope) does not fit: it must still end parked, once, with its
reason, without the worker opening session after session to settle it again."""

from __future__ import annotations

import logging

import pytest
from pydantic import BaseModel

from brokerjobs import App, JobRun, Middleware, Park, RetryPolicy, job
from brokerjobs import envelope as wire
from brokerjobs.broker.amqp.properties import MAX_PROPERTIES_BYTES
from brokerjobs.envelope import Delivery, OutgoingMessage, new_job_id
from tests.support.broker import Broker, make_settings, running_worker, unique, wait_for

JOB = "bulky.job"


@job(JOB, retry=RetryPolicy(delays=(1.0,), max_attempts=2))
class Bulky(BaseModel):
    fail: bool = False


def padded(body: bytes, room: int) -> OutgoingMessage:
    """A message whose properties leave about ``room`` bytes of the frame free."""
    return OutgoingMessage(body, new_job_id(), JOB, 0, {"pad": "x" * (MAX_PROPERTIES_BYTES - room)})


class Decisions(Middleware):
    """What ``run.decision`` says once the delivery is settled."""

    def __init__(self) -> None:
        self.final: list[object] = []

    async def after_settle(self, run: JobRun) -> None:
        if run.decision is not None:
            self.final.append(run.decision)


async def park_one(
    broker: Broker,
    message: OutgoingMessage,
    caplog: pytest.LogCaptureFixture,
    decisions: Decisions | None = None,
) -> Delivery:
    caplog.set_level(logging.INFO, logger="brokerjobs")
    app = App(unique("bulky"), middleware=[decisions] if decisions else [])
    handled: list[Bulky] = []
    queue = app.queue(f"{app.name}.q", "bulky.*")

    @app.handler(Bulky, queue=queue)
    async def handle(task: Bulky) -> None:
        if task.fail:
            raise RuntimeError("e" * 5000)  # a long message: a 4000-char traceback
        handled.append(task)

    broker.track(app)
    async with running_worker(app, make_settings()) as worker:
        channel = await broker.fresh_channel()
        await channel.publish(message, app.exchange, JOB)
        await channel.publish(OutgoingMessage(b"{}", new_job_id(), JOB, 0, {}), app.exchange, JOB)
        await wait_for(lambda: broker.depth_is(f"{queue.name}.parked", 1), timeout=15)
        await wait_for(lambda: len(handled) == 1)
        assert worker.ready
        assert await broker.depth(queue.name) == 0
    assert not [r for r in caplog.records if "reconnecting" in r.getMessage()]
    [parked] = await broker.drain(f"{queue.name}.parked")
    assert parked.message_id == message.message_id and parked.body == message.body
    assert "x-death" not in parked.headers  # our own confirmed copy, not a broker dead letter
    return parked


async def test_a_poison_job_whose_parking_copy_cannot_fit_is_parked_without_its_headers(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    parked = await park_one(broker, padded(b"not json", room=150), caplog)
    assert "malformed JSON" in str(parked.headers[wire.PARK_REASON])
    assert "pad" not in parked.headers and "pad" in str(parked.headers[wire.DROPPED_HEADERS])
    assert parked.headers[wire.ORIGIN_QUEUE]


async def test_a_failing_job_whose_retry_copy_cannot_fit_is_parked_instead(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    decisions = Decisions()
    parked = await park_one(broker, padded(b'{"fail": true}', room=150), caplog, decisions)
    assert "retry copy cannot be sent" in str(parked.headers[wire.PARK_REASON])
    assert "pad" in str(parked.headers[wire.DROPPED_HEADERS])
    # run.decision says what was carried out: parked, not the retry first decided.
    assert [type(d) for d in decisions.final] == [Park]


async def test_a_parking_copy_too_large_with_its_traceback_is_parked_without_it(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    message = padded(b'{"fail": true}', room=4500)
    message.headers[wire.ATTEMPT] = 2  # the last attempt: parked, with a traceback
    parked = await park_one(broker, message, caplog)
    assert "e" * 100 in str(parked.headers[wire.PARK_REASON])
    assert wire.ERROR_TRACEBACK not in parked.headers
    assert parked.headers["pad"] == message.headers["pad"]  # the headers fit without it
