"""The topology plan: names, arguments per queue kind, and app validation."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from brokerjobs import App, ConfigError, RetryPolicy, job
from brokerjobs.topology import QueueSpec, plan, topic_matches


@job("media.resize", retry=RetryPolicy(delays=(1.0, 60.0), max_attempts=3))
class Resize(BaseModel):
    path: str


def test_classic_plan_has_parking_retry_tiers_and_a_plain_main_queue() -> None:
    topology = plan("media", [(QueueSpec("media.q", ("media.*",)), [1.0, 60.0, 1.0])])
    by_name = {q.name: q for q in topology.queues}
    assert set(by_name) == {"media.q", "media.q.retry.1s", "media.q.retry.1m", "media.q.parked"}
    assert dict(by_name["media.q"].arguments) == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "media.q.parked",
    }
    assert by_name["media.q"].patterns == ("media.*",)
    assert dict(by_name["media.q.retry.1m"].arguments) == {
        "x-message-ttl": 60000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "media.q",
    }
    assert dict(by_name["media.q.parked"].arguments) == {}
    assert by_name["media.q.retry.1s"].patterns == ()  # tiers are never bound to the topic


def test_quorum_plan_never_sends_max_priority_and_sets_limits_and_dead_lettering() -> None:
    topology = plan("m", [(QueueSpec("q", ("a",), kind="quorum", delivery_limit=7), [2.0])])
    main = topology.queue("q").arguments
    assert "x-max-priority" not in main
    assert main["x-queue-type"] == "quorum"
    assert main["x-delivery-limit"] == 7
    assert main["x-dead-letter-strategy"] == "at-least-once"
    assert main["x-overflow"] == "reject-publish"
    retry = topology.queue("q.retry.2s").arguments
    assert (retry["x-queue-type"], retry["x-delivery-limit"]) == ("quorum", 7)
    assert topology.queue("q.parked").arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 1_000_000,
    }


@job("media.plain")
class Plain(BaseModel):
    path: str


@job("media.urgent", priority=3)
class Urgent(BaseModel):
    path: str


@job("media.rush", priority=7)
class Rush(BaseModel):
    path: str


def _main_arguments(app: App, queue: str) -> dict[str, object]:
    return dict(app.topology().queue(queue).arguments)


def test_a_classic_queue_is_a_priority_queue_only_when_a_job_on_it_declares_a_priority() -> None:
    app = App("media")
    plain = app.queue("media.plain", "media.plain")
    ranked = app.queue("media.ranked", "media.#")

    @app.handler(Plain, queue=plain)
    async def handle_plain(task: Plain) -> None: ...

    @app.handler(Urgent, queue=ranked)
    async def handle_urgent(task: Urgent) -> None: ...

    @app.handler(Rush, queue=ranked)
    async def handle_rush(task: Rush) -> None: ...

    @app.handler(Plain, queue=ranked)
    async def handle_plain_too(task: Plain) -> None: ...

    assert "x-max-priority" not in _main_arguments(app, "media.plain")
    # The fewest levels that serve: 0..7, not a fixed 10.
    assert _main_arguments(app, "media.ranked")["x-max-priority"] == 7


def test_a_queue_that_asks_for_priorities_gets_what_it_asks_for() -> None:
    app = App("media")
    asked = app.queue("media.asked", "media.plain", max_priority=3)
    quorum = app.queue("media.quorum", "media.rush", kind="quorum", max_priority=3)

    @app.handler(Plain, queue=asked)
    async def handle(task: Plain) -> None: ...

    @app.handler(Rush, queue=quorum)
    async def rush(task: Rush) -> None: ...

    assert _main_arguments(app, "media.asked")["x-max-priority"] == 3
    assert "x-max-priority" not in _main_arguments(app, "media.quorum")  # refused by RabbitMQ


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "x.y", True),
        ("*.b.#", "a.b", True),
        ("*", "a.b", False),
        ("a.#.c", "a.x.y.c", True),
    ],
)
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_an_app_plans_default_queues_and_tiers_from_handler_policies() -> None:
    app = App("media")

    @app.handler(Resize)
    async def resize(task: Resize) -> None: ...

    names = [q.name for q in app.topology().queues]
    assert names == [
        "media.media.resize.parked",
        "media.media.resize.retry.1s",
        "media.media.resize.retry.1m",
        "media.media.resize",
    ]


def test_a_handler_on_a_queue_that_cannot_receive_its_job_is_refused() -> None:
    app = App("media")
    app.queue("media.docs", "docs.*")
    with pytest.raises(ConfigError, match="would never receive job 'media.resize'"):
        app.handler(Resize, queue="media.docs")


def test_a_sync_handler_cannot_claim_to_run_on_the_loop() -> None:
    app = App("media")
    with pytest.raises(ConfigError, match="not async"):

        @app.handler(Resize, run_in="loop")
        def resize(task: Resize) -> None: ...


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "amq.x", "patterns": ("a",)},
        {"name": "q", "patterns": ()},
        {"name": "q", "patterns": ("a.b*",)},
        {"name": "q", "patterns": ("a",), "max_priority": 0},
    ],
)
def test_invalid_queue_specs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        QueueSpec(**kwargs)  # type: ignore[arg-type]


def test_delay_routes_encode_the_delay_in_binary_highest_level_first() -> None:
    from brokerjobs.topology import delay_route

    assert delay_route("shop", 4, 5, "email.send") == ("shop.delay.3", "0.1.0.1.email.send")
    assert delay_route("shop", 4, 0.2, "a") == ("shop.delay.3", "0.0.0.1.a")  # rounds up
    assert delay_route("shop", 4, 0, "a") == ("shop.delay.3", "0.0.0.0.a")
    with pytest.raises(ConfigError, match="exceeds the 15s maximum"):
        delay_route("shop", 4, 16, "a")


def test_delay_levels_plan_wait_queues_and_bindings_that_mirror_the_main_patterns() -> None:
    topology = plan("x", [(QueueSpec("x.q", ("a.*",)), [1.0])], delay_levels=2)
    assert topology.exchanges == ("x.delay.0", "x.delay.1", "x.delayed")
    level1 = topology.queue("x.delay.1.2s")
    assert dict(level1.arguments) == {"x-message-ttl": 2000, "x-dead-letter-exchange": "x.delay.0"}
    assert dict(topology.queue("x.delay.0.1s").arguments)["x-dead-letter-exchange"] == "x.delayed"
    assert {(b.source, b.destination, b.pattern, b.to_exchange) for b in topology.bindings} == {
        ("x.delay.1", "x.delay.1.2s", "1.#", False),
        ("x.delay.1", "x.delay.0", "0.#", True),
        ("x.delay.0", "x.delay.0.1s", "*.1.#", False),
        ("x.delay.0", "x.delayed", "*.0.#", True),
        ("x.delayed", "x.q", "*.*.a.*", False),
    }


def test_parked_jobs_expire_only_when_asked() -> None:
    kept = plan("x", [(QueueSpec("q", ("a",)), [])]).queue("q.parked")
    assert "x-message-ttl" not in kept.arguments
    dropped = plan("x", [(QueueSpec("q", ("a",), parked_ttl=86400), [])]).queue("q.parked")
    assert dropped.arguments["x-message-ttl"] == 86_400_000
