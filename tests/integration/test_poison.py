"""Bad input never crashes the worker nor loops: it is parked once, with its reason."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from brokerjobs import App, job
from brokerjobs.envelope import PARK_REASON, OutgoingMessage, new_job_id
from tests.support.broker import Broker, make_settings, running_worker, unique, wait_for


@job("invoice.create")
class CreateInvoice(BaseModel):
    customer: str
    amount_cents: int


def raw(body: bytes, job_name: str | None = "invoice.create") -> OutgoingMessage:
    return OutgoingMessage(
        body=body, message_id=new_job_id(), job_name=job_name, priority=0, headers={}
    )


POISON = [
    pytest.param(raw(b'{"customer": "acme", "amount_cents": '), "malformed JSON", id="malformed"),
    pytest.param(
        raw(b'{"customer": "acme", "amount_cents": "lots"}'),
        "does not match CreateInvoice",
        id="wrong-schema",
    ),
    pytest.param(raw(b"{}", job_name="invoice.delete"), "unknown job type", id="unknown-type"),
    pytest.param(raw(b'{"customer": "\xff\xfe"}'), "not valid UTF-8", id="non-utf8"),
    pytest.param(raw(b'{"customer": "' + b"x" * 5000 + b'"}'), "exceeds the limit", id="too-big"),
]


@pytest.mark.parametrize(("message", "reason"), POISON)
async def test_poison_input_is_parked_with_its_reason_and_the_worker_goes_on(
    broker: Broker, message: OutgoingMessage, reason: str
) -> None:
    app = App(unique("poison"))
    handled: list[CreateInvoice] = []
    queue = app.queue(f"{app.name}.invoices", "invoice.*")

    @app.handler(CreateInvoice, queue=queue)
    async def create(task: CreateInvoice) -> None:
        handled.append(task)

    broker.track(app)
    async with running_worker(app, make_settings(max_body_bytes=4096)) as worker:
        channel = await broker.fresh_channel()
        await channel.publish(message, app.exchange, "invoice.create")
        good = raw(b'{"customer": "acme", "amount_cents": 100}')
        await channel.publish(good, app.exchange, "invoice.create")

        await wait_for(lambda: len(handled) == 1)
        parked = []

        async def one_parked() -> bool:
            parked.extend(await broker.drain(f"{queue.name}.parked"))
            return len(parked) >= 1

        await wait_for(one_parked)
        assert worker.ready
        assert await broker.depth(queue.name) == 0

    [copy] = parked
    assert copy.message_id == message.message_id
    assert copy.body == message.body
    assert reason in copy.headers[PARK_REASON]
    assert handled == [CreateInvoice(customer="acme", amount_cents=100)]
