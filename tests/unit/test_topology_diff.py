"""The pure topology diff: obsolete tiers and queues of removed handlers, differing arguments."""

from __future__ import annotations

from pydantic import BaseModel

from brokerjobs import App, RetryPolicy, job
from brokerjobs.broker_queues import candidate_names, parse_management, parse_rabbitmqctl
from brokerjobs.topology import TopologyPlan
from brokerjobs.topology_diff import BrokerQueue, diff


class Email(BaseModel):
    to: str


def shop(delays: tuple[float, ...], *, resize: bool = False) -> App:
    app = App("shop")
    app.queue("shop.emails", "email.#")
    send: type[BaseModel] = job("email.send", retry=RetryPolicy(delays=delays, max_attempts=3))(
        type("SendEmail", (Email,), {})
    )
    app.handler(send, queue="shop.emails")(_handle)
    if resize:
        app.handler(job("image.resize")(type("Resize", (Email,), {})))(_handle)
    return app


async def _handle(_: BaseModel) -> None:
    pass


def on_broker(topology: TopologyPlan, messages: int = 0) -> list[BrokerQueue]:
    return [BrokerQueue(q.name, messages, dict(q.arguments)) for q in topology.queues]


def test_an_app_whose_delays_changed_shows_its_old_tiers_with_their_main_queue() -> None:
    old = shop((1, 5, 30)).topology()
    new = shop((2, 30)).topology()
    found = diff(new, on_broker(old, messages=3), "shop")
    assert [(o.name, o.main, o.queue.messages) for o in found.obsolete] == [
        ("shop.emails.retry.1s", "shop.emails", 3),
        ("shop.emails.retry.5s", "shop.emails", 3),
    ]
    assert found.missing == ("shop.emails.retry.2s",)
    assert found.differing == ()
    assert "obsolete shop.emails.retry.5s (3 message(s)): retry tier 5s is no longer" in (
        found.describe()
    )


def test_queues_of_a_removed_handler_are_obsolete_with_nowhere_to_drain() -> None:
    old = shop((1,), resize=True).topology()
    found = diff(shop((1,)).topology(), on_broker(old), "shop")
    assert {o.name: o.main for o in found.obsolete} == {
        "shop.image.resize": None,
        "shop.image.resize.parked": None,
        "shop.image.resize.retry.1s": None,
        "shop.image.resize.retry.5s": None,
        "shop.image.resize.retry.30s": None,
        "shop.image.resize.retry.2m": None,
        "shop.image.resize.retry.10m": None,
        "shop.image.resize.retry.1h": None,
    }
    assert [o.name.removeprefix("shop.image.resize") for o in found.obsolete] == [
        "",
        ".retry.1s",
        ".retry.5s",
        ".retry.30s",
        ".retry.2m",
        ".retry.10m",
        ".retry.1h",
        ".parked",
    ]  # each main's queues together, tiers by delay


def test_queues_the_app_did_not_make_are_never_obsolete() -> None:
    topology = shop((1,)).topology()
    foreign = [
        BrokerQueue("billing.retry.5s", 1, {"x-dead-letter-routing-key": "billing"}),
        BrokerQueue("shop.emails.retry.5s", 1, {"x-dead-letter-routing-key": "elsewhere"}),
        BrokerQueue("shop.scheduler", 1, {}),
        BrokerQueue("shop.delay.3.8s", 0, {"x-message-ttl": 8000}),
        BrokerQueue("shop.cache", 0, {"x-dead-letter-routing-key": "shop.other"}),
        BrokerQueue("shop.emails.retry.soon", 0, {}),
    ]
    assert diff(topology, on_broker(topology) + foreign, "shop").obsolete == ()


def test_a_tier_seen_without_arguments_is_judged_by_its_name() -> None:
    topology = shop((1,)).topology()
    found = diff(topology, [BrokerQueue("shop.emails.retry.7s", 2)], "shop")
    assert [(o.name, o.main) for o in found.obsolete] == [("shop.emails.retry.7s", "shop.emails")]


def test_a_planned_queue_whose_arguments_differ_names_each_argument() -> None:
    topology = shop((1,)).topology()
    broker = on_broker(topology)
    main = next(q for q in broker if q.name == "shop.emails")
    broker.remove(main)
    args = {**dict(main.arguments or {}), "x-max-priority": 10, "x-queue-type": "classic"}
    broker.append(BrokerQueue("shop.emails", 0, args))
    found = diff(topology, broker, "shop")
    assert [(d.name, d.arguments) for d in found.differing] == [
        ("shop.emails", (("x-max-priority", None, 10),))
    ]
    assert "differs  shop.emails: x-max-priority planned nothing, broker has 10" in (
        found.describe()
    )
    assert found.as_json()["differing"] == [
        {"queue": "shop.emails", "argument": "x-max-priority", "planned": None, "broker": 10}
    ]


def test_a_broker_that_matches_says_so() -> None:
    topology = shop((1,)).topology()
    found = diff(topology, on_broker(topology), "shop")
    assert found.clean
    assert found.describe() == "the broker matches the plan: nothing obsolete, nothing differs"


def test_rabbitmqctl_and_management_listings_read_names_arguments_and_depths() -> None:
    text = (
        '[{"name":"a.retry.5s","arguments":[["x-message-ttl","signedint",5000],'
        '["x-dead-letter-routing-key","longstr","a"]],"messages":4},'
        '{"name":"a","arguments":[],"messages":0}]'
    )
    assert parse_rabbitmqctl(text) == [
        BrokerQueue("a.retry.5s", 4, {"x-message-ttl": 5000, "x-dead-letter-routing-key": "a"}),
        BrokerQueue("a", 0, {}),
    ]
    assert parse_rabbitmqctl("") == []
    rows = [{"name": "a", "arguments": {"x-queue-type": "quorum"}, "messages": None}]
    assert parse_management(rows) == [BrokerQueue("a", 0, {"x-queue-type": "quorum"})]


def test_candidate_tiers_for_the_start_up_check_leave_out_the_planned_ones() -> None:
    names = candidate_names(shop((1, 5)).topology())
    assert "shop.emails.retry.30s" in names and "shop.emails.retry.1h" in names
    assert "shop.emails.retry.1s" not in names and "shop.emails.retry.5s" not in names
    assert len(names) == len(set(names))


def test_an_obsolete_queue_is_quorum_by_its_arguments_or_else_by_its_main_queue() -> None:
    app = App("shop", queue_kind="quorum")
    app.queue("shop.emails", "email.#")
    app.handler(job("email.send")(type("Send", (Email,), {})), queue="shop.emails")(_handle)
    topology = app.topology()
    guessed = BrokerQueue("shop.emails.retry.7s", 0)  # passive declare: arguments unknown
    listed = BrokerQueue("shop.emails.retry.9s", 0, {"x-dead-letter-routing-key": "shop.emails"})
    found = diff(topology, [guessed, listed], "shop")
    assert [(o.name, o.quorum) for o in found.obsolete] == [
        ("shop.emails.retry.7s", True),
        ("shop.emails.retry.9s", False),  # a classic tier left from before the app went quorum
    ]
