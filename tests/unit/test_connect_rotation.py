"""Connecting to a list of nodes: each attempt is bounded, every node is tried in turn.

Real sockets only. The "bad" first node of each list is a local socket that listens and never
answers (a blackhole: a partitioned or wedged node), a closed port (refuses), or one that
accepts and closes at once (resets); the second node is the real broker.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest

from brokerjobs import BrokerUnreachable
from brokerjobs.broker.amqp import connect
from brokerjobs.settings import Settings
from tests.support.broker import TEST_URL, make_settings

ATTEMPT_S = 1.0
SLACK_S = 2.0  # connecting to the real broker plus a loaded test machine


@contextmanager
def blackhole() -> Iterator[int]:
    """A listening socket that is never accept()ed: the kernel completes TCP, nobody answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def resetting() -> AsyncIterator[int]:
    """Accepts each connection and aborts it at once (RST)."""

    async def reset(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def node(port: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/"


def two_nodes(bad_port: int, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "url": f"{node(bad_port)},{TEST_URL}",
        "connect_attempt_timeout": ATTEMPT_S,
        "connect_timeout": 20.0,
    }
    values.update(overrides)
    return make_settings(**values)


async def connects_within(settings: Settings, bound: float) -> float:
    started = time.monotonic()
    connection = await asyncio.wait_for(connect(settings, "test"), bound + 10)
    took = time.monotonic() - started
    try:
        assert connection.server_version >= (3,)  # the real broker answered
    finally:
        await connection.close()
    assert took < bound, f"connected after {took:.1f}s, bound {bound:g}s"
    return took


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("connect to ")]


@pytest.mark.usefixtures("_require_broker")
async def test_a_blackholed_first_node_costs_one_attempt_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with blackhole() as port:
        took = await connects_within(two_nodes(port), ATTEMPT_S + SLACK_S)
    assert took >= ATTEMPT_S * 0.9  # it did wait for the silent node, once
    [line] = retry_lines(caplog)
    assert line.levelno == logging.WARNING and line.name == "brokerjobs.transport"
    assert "no answer within 1s" in line.getMessage()


@pytest.mark.usefixtures("_require_broker")
async def test_a_refusing_first_node_is_skipped_at_once(caplog: pytest.LogCaptureFixture) -> None:
    await connects_within(two_nodes(closed_port()), SLACK_S)
    [line] = retry_lines(caplog)
    assert line.levelno == logging.WARNING
    # aiormq's own ERROR line for the failed TCP connect is silenced: one line per retry.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.usefixtures("_require_broker")
async def test_a_resetting_first_node_is_skipped_at_once(caplog: pytest.LogCaptureFixture) -> None:
    async with resetting() as port:
        await connects_within(two_nodes(port), SLACK_S)
    assert len(retry_lines(caplog)) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_every_node_is_tried_in_turn_until_the_total_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    refused = closed_port()
    with blackhole() as silent:
        settings = make_settings(
            url=f"{node(silent)},amqp://guest:secret-pw@127.0.0.1:{refused}/",
            connect_attempt_timeout=0.5,
            connect_timeout=3.0,
        )
        started = time.monotonic()
        with pytest.raises(BrokerUnreachable, match="cannot reach RabbitMQ") as info:
            await asyncio.wait_for(connect(settings, "test"), 10)
    took = time.monotonic() - started
    assert 3.0 * 0.8 < took < 3.0 + 1.5
    tried = [r.getMessage().split()[2] for r in retry_lines(caplog)]
    assert len(tried) >= 3
    expected = [f"127.0.0.1:{silent}/", f"127.0.0.1:{refused}/"]
    assert all(t.endswith(expected[i % 2]) for i, t in enumerate(tried)), tried  # in turn
    assert "secret-pw" not in str(info.value) + caplog.text


def test_defaults_detect_a_silent_peer_within_20s_and_leave_time_for_other_nodes() -> None:
    settings = Settings()
    # aiormq: dead after (heartbeat + 1) * 3 s of silence, checked every heartbeat // 2 s.
    detection = (settings.heartbeat + 1) * 3 + settings.heartbeat // 2
    assert 15 <= detection <= 20
    assert settings.connect_attempt_timeout * 3 < settings.connect_timeout
