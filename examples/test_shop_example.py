"""How an application team unit-tests its handlers with brokerjobs.testing: no RabbitMQ needed.

    pytest examples/test_shop_example.py

TestBroker runs the app's real handlers, retry policy, envelope and routing on in-memory queues;
retries wait on a virtual clock, so a 5-minute retry costs nothing. (pytest-asyncio in auto mode,
as configured in this repository's pyproject.toml.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

from brokerjobs import App, RetryPolicy, current_job, job
from brokerjobs.testing import TestBroker

# -- the application under test (in a real project: `from shop.jobs import app, ...`) --------


@job("email.send", retry=RetryPolicy(delays=(30, 300), max_attempts=3))
class SendEmail(BaseModel):
    to: str
    subject: str


class Mailer:
    """The shop's mail gateway; this one fails the first ``outages`` sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int]] = []
        self.outages = 0

    async def send(self, to: str, subject: str) -> None:
        if self.outages:
            self.outages -= 1
            raise ConnectionError("SMTP server unavailable")
        self.sent.append((to, subject, current_job().attempt))


mailer = Mailer()
app = App("shop")
app.queue("shop.emails", "email.#")


@app.handler(SendEmail, queue="shop.emails")
async def send_email(email: SendEmail) -> None:
    await mailer.send(email.to, email.subject)


# -- the tests ---------------------------------------------------------------------------------


@pytest.fixture
async def broker() -> AsyncIterator[TestBroker]:
    mailer.sent.clear()
    mailer.outages = 0
    async with TestBroker(app) as broker:
        yield broker


async def test_an_email_job_is_sent(broker: TestBroker) -> None:
    await broker.publish(SendEmail(to="ada@example.com", subject="Your order"))
    await broker.run_until_idle()

    assert mailer.sent == [("ada@example.com", "Your order", 1)]
    assert broker.completed(SendEmail) == [SendEmail(to="ada@example.com", subject="Your order")]


async def test_an_smtp_outage_is_retried_after_30_seconds(broker: TestBroker) -> None:
    mailer.outages = 1
    await broker.publish(SendEmail(to="ada@example.com", subject="Your order"))

    await broker.run_until_idle(advance_clock=False)  # first attempt fails, waits in a tier
    assert mailer.sent == []
    assert broker.queue_depths()["shop.emails.retry.30s"] == 1

    await broker.advance(30)  # virtual seconds: the test does not wait
    assert mailer.sent == [("ada@example.com", "Your order", 2)]


async def test_a_long_outage_parks_the_email_for_operators(broker: TestBroker) -> None:
    mailer.outages = 3
    await broker.publish(SendEmail(to="ada@example.com", subject="Your order"))
    await broker.run_until_idle()  # jumps the clock through every retry

    [parked] = broker.parked("shop.emails")
    assert parked.attempts == 3
    assert parked.error == "gave up after 3 attempts: ConnectionError: SMTP server unavailable"
    assert broker.now == 330  # 30 s + 300 s of retry delays


async def test_malformed_input_is_parked_not_retried(broker: TestBroker) -> None:
    await broker.publish_raw(b'{"to": "ada@example.com"}', "email.send")  # no subject
    await broker.run_until_idle()

    [parked] = broker.parked("shop.emails")
    assert "subject: Field required" in parked.error
    assert mailer.sent == []
