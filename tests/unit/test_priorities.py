"""Which job priorities a queue honours, per queue kind and RabbitMQ version, and how the worker
says so at start-up."""

from __future__ import annotations

import logging

import pytest
from pydantic import BaseModel

from brokerjobs import App, ConfigError, job
from brokerjobs.priorities import check_queue, classic_max_priority
from brokerjobs.worker import Worker
from tests.support.broker import make_settings

V3_10 = (3, 10, 8)
V3_13 = (3, 13, 7)
V4_0 = (4, 0, 5)
V4_2 = (4, 2, 1)
V4_3 = (4, 3, 0)


def test_classic_queues_get_the_fewest_priority_levels_that_serve() -> None:
    assert classic_max_priority(None, []) is None
    assert classic_max_priority(None, [0, 0]) is None
    assert classic_max_priority(None, [0, 3, 7]) == 7
    assert classic_max_priority(2, [0, 7]) == 2  # asked for: kept (and warned about)


def test_jobs_without_a_priority_are_fine_everywhere() -> None:
    for kind in ("classic", "quorum"):
        for version in ((), V3_10, V4_0, V4_3):
            assert check_queue("q", kind, None, {"a": 0}, version) == []


@pytest.mark.parametrize("version", [(), V3_10, V4_0, V4_3])
def test_classic_priorities_within_the_queues_maximum_are_strict_on_every_version(
    version: tuple[int, ...],
) -> None:
    assert check_queue("q", "classic", 7, {"a": 3, "b": 7}, version) == []


@pytest.mark.parametrize("version", [V3_10, V4_0])
def test_a_classic_priority_above_the_queues_maximum_is_a_warning_naming_the_fix(
    version: tuple[int, ...],
) -> None:
    [finding] = check_queue("q", "classic", 3, {"a": 2, "b": 9}, version)
    assert finding.severity == "warning"
    assert "'b' (9)" in finding.message and "'a'" not in finding.message
    assert "holds priorities 0-3" in finding.message
    assert "run as priority 3" in finding.message
    assert "raise max_priority in app.queue('q', ...)" in finding.message


@pytest.mark.parametrize("version", [V3_10, V3_13])
def test_quorum_priorities_on_3x_are_refused(version: tuple[int, ...]) -> None:
    [finding] = check_queue("q", "quorum", None, {"a": 5}, version)
    assert finding.severity == "error"
    assert f"RabbitMQ {'.'.join(map(str, version))} ignores on quorum queues" in finding.message
    assert "use a classic queue for them, drop the priority, or upgrade" in finding.message


@pytest.mark.parametrize("version", [V4_0, V4_2])
def test_quorum_priorities_on_4_0_to_4_2_warn_about_the_two_levels(
    version: tuple[int, ...],
) -> None:
    [finding] = check_queue("q", "quorum", None, {"low": 3, "high": 9, "none": 0}, version)
    assert finding.severity == "warning"
    message = finding.message
    assert "two priority levels only: 0-4 normal and 5+ high" in message
    assert "'low' (3) run as normal, the same as no priority" in message
    assert "'high' (9) run as high, about two for every normal job, not strictly first" in message
    assert "'none'" not in message
    assert "use a classic queue for strict priorities" in message


def test_quorum_priorities_on_4_0_with_only_high_jobs_still_say_they_are_not_strict() -> None:
    [finding] = check_queue("q", "quorum", None, {"high": 5}, V4_0)
    assert "not strictly first" in finding.message
    assert "run as normal" not in finding.message


def test_quorum_priorities_on_4_3_are_strict_up_to_31_and_capped_above() -> None:
    assert check_queue("q", "quorum", None, {"a": 1, "b": 31}, V4_3) == []
    [finding] = check_queue("q", "quorum", None, {"a": 1, "b": 200}, V4_3)
    assert finding.severity == "warning"
    assert "honours priorities 0-31: 'b' (200) run as priority 31" in finding.message


def test_quorum_rules_are_skipped_when_the_broker_does_not_say_its_version() -> None:
    assert check_queue("q", "quorum", None, {"a": 9}, ()) == []


# -- the worker's start-up check, which applies the rule to the app's queues -------------------


@job("report.urgent", priority=9)
class UrgentReport(BaseModel):
    n: int


@job("report.plain")
class PlainReport(BaseModel):
    n: int


def _app(kind: str, max_priority: int | None = None) -> App:
    app = App("reports")
    queue = app.queue("reports.q", "report.*", kind=kind, max_priority=max_priority)  # type: ignore[arg-type]

    @app.handler(UrgentReport, queue=queue)
    async def urgent(task: UrgentReport) -> None: ...

    @app.handler(PlainReport, queue=queue)
    async def plain(task: PlainReport) -> None: ...

    return app


def test_the_start_up_check_refuses_quorum_priorities_on_3x() -> None:
    worker = Worker(_app("quorum"), make_settings())
    with pytest.raises(ConfigError, match="ignores on quorum queues"):
        worker._check_priorities(V3_10)


@pytest.mark.parametrize(
    ("kind", "max_priority", "version", "expected"),
    [
        ("quorum", None, V4_0, "two priority levels only"),
        ("quorum", None, V4_3, None),
        ("classic", None, V3_10, None),  # sized to the job: 0-9
        ("classic", 5, V4_0, "holds priorities 0-5"),
    ],
)
def test_the_start_up_check_warns_in_plain_words(
    caplog: pytest.LogCaptureFixture,
    kind: str,
    max_priority: int | None,
    version: tuple[int, ...],
    expected: str | None,
) -> None:
    worker = Worker(_app(kind, max_priority), make_settings())
    with caplog.at_level(logging.WARNING, "brokerjobs.worker"):
        worker._check_priorities(version)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if expected is None:
        assert warnings == []
    else:
        [warning] = warnings
        assert warning.startswith("job priorities not honoured as written: ")
        assert expected in warning


def test_the_start_up_warning_is_given_once_not_on_every_reconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = Worker(_app("classic", 5), make_settings())
    with caplog.at_level(logging.WARNING, "brokerjobs.worker"):
        for _ in range(3):  # each session checks again
            worker._check_priorities(V4_0)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
