"""The delivery pipeline's rules, on the real worker over the in-memory broker."""

from __future__ import annotations

import logging

import pytest
from pydantic import BaseModel

from brokerjobs import App, ConfigError, JobRun, Middleware, Outcome, RetryPolicy, SkipJob, job
from brokerjobs.envelope import OutgoingMessage
from brokerjobs.middleware import Pipeline
from brokerjobs.testing import TestBroker


@job("mw.step")
class Step(BaseModel):
    n: int


class Points(Middleware):
    """Records every delivery point it sees, as (point, job id)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def received(self, run: JobRun) -> None:
        self.seen.append("received")

    async def decoded(self, run: JobRun) -> None:
        self.seen.append("decoded")

    async def before_handler(self, run: JobRun) -> None:
        self.seen.append("before_handler")

    async def after_success(self, run: JobRun) -> None:
        self.seen.append("after_success")

    async def after_failure(self, run: JobRun) -> None:
        self.seen.append("after_failure")

    async def after_settle(self, run: JobRun) -> None:
        assert run.settled is not None
        self.seen.append(f"after_settle:{run.settled.outcome}")


class Broken(Middleware):
    async def before_handler(self, run: JobRun) -> None:
        raise RuntimeError("a buggy middleware")

    async def after_settle(self, run: JobRun) -> None:
        raise RuntimeError("buggy again")


def step_app(*middleware: Middleware) -> App:
    app = App("mw", middleware=list(middleware))

    @app.handler(Step)
    async def handle(step: Step) -> None:
        if step.n < 0:
            raise ValueError("negative")

    return app


async def test_the_points_come_in_the_documented_order() -> None:
    points = Points()
    async with TestBroker(step_app(points)) as broker:
        await broker.publish(Step(n=1))
        await broker.run_until_idle()
    assert points.seen == [
        "received",
        "decoded",
        "before_handler",
        "after_success",
        "after_settle:completed",
    ]


async def test_an_undecodable_message_skips_to_after_settle_once() -> None:
    points = Points()
    async with TestBroker(step_app(points)) as broker:
        await broker.publish_raw(b"{not json", "mw.step")
        await broker.run_until_idle()
    assert points.seen == ["received", "after_settle:parked"]
    assert [o.action for o in broker.outcomes] == [Outcome.PARKED]


async def test_a_failing_job_gets_the_decision_before_it_is_carried_out() -> None:
    decisions: list[tuple[int, str]] = []

    class Decisions(Middleware):
        async def after_failure(self, run: JobRun) -> None:
            decisions.append((run.attempt, type(run.decision).__name__))

    async with TestBroker(step_app(Decisions())) as broker:
        await broker.publish(Step(n=-1))
        await broker.run_until_idle()
    assert decisions[0] == (1, "Retry")
    assert decisions[-1][1] == "Park"
    assert broker.outcomes[-1].action is Outcome.PARKED


async def test_a_hook_that_raises_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    points = Points()
    with caplog.at_level(logging.ERROR, "brokerjobs.middleware"):
        async with TestBroker(step_app(Broken(), points)) as broker:
            await broker.publish(Step(n=1))
            await broker.run_until_idle()
    assert [o.action for o in broker.outcomes] == [Outcome.COMPLETED]
    assert points.seen[-1] == "after_settle:completed"  # later middleware still ran
    failures = [r.getMessage() for r in caplog.records]
    assert any("Broken.before_handler failed" in f for f in failures)
    assert any("Broken.after_settle failed" in f for f in failures)


class Skipper(Middleware):
    async def before_handler(self, run: JobRun) -> None:
        raise SkipJob("already done elsewhere")


async def test_a_skipped_job_settles_completed_with_its_reason_and_the_handler_never_runs() -> None:
    ran: list[int] = []
    points = Points()
    app = App("mw", middleware=[Skipper(), points])

    @app.handler(Step)
    async def handle(step: Step) -> None:
        ran.append(step.n)

    async with TestBroker(app) as broker:
        await broker.publish(Step(n=1))
        await broker.run_until_idle()
    assert ran == []
    (outcome,) = broker.outcomes
    assert (outcome.action, outcome.reason) == (
        Outcome.COMPLETED,
        "skipped: already done elsewhere",
    )
    # The layer inside the answering one never saw the job: only its after_settle is called.
    assert points.seen == ["received", "decoded", "after_settle:completed"]


async def test_a_handler_raising_skip_job_completes_without_an_immediate_retry() -> None:
    calls: list[int] = []
    app = App("mw")

    @app.handler(Step, retry=RetryPolicy(immediate_retries=2))
    async def handle(step: Step) -> None:
        calls.append(step.n)
        raise SkipJob("nothing to do")

    async with TestBroker(app) as broker:
        await broker.publish(Step(n=1))
        await broker.run_until_idle()
    assert calls == [1]
    assert [(o.action, o.reason) for o in broker.outcomes] == [
        (Outcome.COMPLETED, "skipped: nothing to do")
    ]


async def test_before_publish_sees_every_message_and_may_add_headers() -> None:
    class Stamp(Middleware):
        def before_publish(self, message: OutgoingMessage, exchange: str, key: str) -> None:
            message.headers["x-tenant"] = "acme"

    app = step_app(Stamp())
    async with TestBroker(app) as broker:
        await broker.publisher.publish_many([Step(n=1), Step(n=2)])
        queued = broker.messages("mw.mw.step")
    assert [m.headers["x-tenant"] for m in queued] == ["acme", "acme"]


def test_hooks_nobody_overrides_are_never_resolved() -> None:
    assert not Pipeline().watches_deliveries
    assert not Pipeline([Middleware()]).watches_deliveries
    pipeline = Pipeline([Points()])
    assert pipeline.watches_deliveries and len(pipeline.after_settle) == 1
    assert pipeline.publishing == ()


def test_only_middleware_can_be_used() -> None:
    app = App("mw")
    with pytest.raises(ConfigError, match="not a brokerjobs.Middleware"):
        app.use(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown hook event"):
        app.on("finish", lambda run: None)  # type: ignore[call-overload]
