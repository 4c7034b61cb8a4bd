"""The delivery boundary: an exception nobody expected parks the job with its reason."""

from __future__ import annotations

import logging

import pytest
from pydantic import BaseModel, field_validator

from brokerjobs import App, job
from brokerjobs.envelope import ERROR_TYPE, PARK_REASON
from brokerjobs.testing import TestBroker


@job("boundary.job")
class Touchy(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def _explode(cls, n: int) -> int:
        if n == 13:  # a validator bug: not a ValueError, so pydantic lets it through
            raise RuntimeError("unlucky number")
        return n


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("cannot print me")


async def test_an_unexpected_exception_parks_the_job_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App("boundary")
    handled: list[int] = []

    @app.handler(Touchy)
    async def handle(task: Touchy) -> None:
        handled.append(task.n)

    async with TestBroker(app) as broker:
        await broker.publish(Touchy.model_construct(n=13))
        await broker.publish(Touchy(n=1))
        with caplog.at_level(logging.ERROR, "brokerjobs.consumer"):
            await broker.run_until_idle()
        [parked] = broker.parked("boundary.boundary.job")
    assert handled == [1]
    assert "unexpected RuntimeError: unlucky number" in str(parked.delivery.headers[PARK_REASON])
    assert parked.delivery.headers[ERROR_TYPE] == "brokerjobs.unexpected"
    assert any(parked.job_id in r.getMessage() for r in caplog.records)


async def test_an_exception_that_cannot_be_printed_still_gets_a_reason() -> None:
    app = App("boundary")

    @app.handler(Touchy)
    async def handle(task: Touchy) -> None:
        raise Unprintable()

    async with TestBroker(app) as broker:
        await broker.publish(Touchy(n=2))
        await broker.run_until_idle()
        parked = broker.parked("boundary.boundary.job")
    assert len(parked) == 1
    assert "Unprintable: <unprintable>" in str(parked[0].delivery.headers[PARK_REASON])
