"""Declaring topology, mismatches, connection errors, and sync handlers."""

from __future__ import annotations

import threading

import pytest
from pydantic import BaseModel

from brokerjobs import App, BrokerUnreachable, Publisher, TopologyMismatch, current_job, job
from brokerjobs.broker.amqp import connect
from brokerjobs.provision import declare
from tests.support.broker import (
    TEST_URL,
    Broker,
    make_settings,
    running_worker,
    unique,
    url_with,
    wait_for,
)


@job("thing.do")
class DoThing(BaseModel):
    n: int


async def test_declare_is_idempotent_and_a_mismatch_names_the_argument(broker: Broker) -> None:
    """Also what an existing deployment meets after upgrading to a brokerjobs that declares
    classic queues without priorities: its queue still has ``x-max-priority=10``."""
    old = App(unique("topo"))
    queue = f"{old.name}.thing.do"
    old.queue(queue, "thing.do", max_priority=10, delivery_limit=20)

    @old.handler(DoThing, queue=queue)
    async def handle(task: DoThing) -> None: ...

    broker.track(old)
    await declare(broker.connection, old.topology())
    await declare(broker.connection, old.topology())  # again: no error

    new = App(old.name)
    new.queue(queue, "thing.do", delivery_limit=5)  # quorum: the delivery limit differs

    @new.handler(DoThing, queue=queue)
    async def handle2(task: DoThing) -> None: ...

    argument = "x-max-priority" if new.queues[queue].kind == "classic" else "x-delivery-limit"
    with pytest.raises(TopologyMismatch, match=f"argument '{argument}' differs") as info:
        await declare(broker.connection, new.topology())
    assert "delete_queue" in str(info.value)


async def test_wrong_credentials_fail_fast_without_printing_the_password() -> None:
    settings = make_settings(url=url_with(password="wrong-pass-123"))
    with pytest.raises(BrokerUnreachable, match="refused the credentials") as info:
        await connect(settings, "test")
    assert "wrong-pass-123" not in str(info.value)


async def test_an_unreachable_broker_is_a_clear_error_after_the_connect_timeout() -> None:
    settings = make_settings(url="amqp://guest:hidden-pw@127.0.0.1:1/", connect_timeout=1.0)
    with pytest.raises(BrokerUnreachable, match="cannot reach RabbitMQ") as info:
        await connect(settings, "test")
    assert "hidden-pw" not in str(info.value)
    assert "guest:***@127.0.0.1:1" in str(info.value)


async def test_a_list_of_nodes_fails_over_to_the_next_reachable_one() -> None:
    settings = make_settings(
        url=f"{url_with(port=1)}, {TEST_URL}",
        connect_timeout=10.0,
    )
    connection = await connect(settings, "test")
    try:
        assert connection.server_version >= (3,)
    finally:
        await connection.close()


async def test_sync_handlers_run_in_threads_and_see_their_job_context(broker: Broker) -> None:
    app = App(unique("sync"))
    seen: list[tuple[int, str, bool]] = []

    @app.handler(DoThing)
    def blocking(task: DoThing) -> None:
        seen.append(
            (task.n, current_job().job_name, threading.current_thread() is threading.main_thread())
        )

    broker.track(app)
    async with running_worker(app):
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            await publisher.publish_many([DoThing(n=i) for i in range(5)])
        await wait_for(lambda: len(seen) == 5)
    assert sorted(seen) == [(i, "thing.do", False) for i in range(5)]
