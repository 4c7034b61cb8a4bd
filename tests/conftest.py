"""Fixtures: the real RabbitMQ is required; a missing broker fails the suite, never skips it."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from tests.support.broker import TEST_URL, Broker, open_broker


def _broker_reachable() -> bool:
    parts = urlsplit(TEST_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 3):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def _require_broker() -> None:
    if not _broker_reachable():
        pytest.fail(
            f"RabbitMQ is not reachable at {urlsplit(TEST_URL).netloc.split('@')[-1]}: "
            "run scripts/ensure-rabbitmq (integration tests never skip)",
            pytrace=False,
        )


@pytest.fixture
async def broker(_require_broker: None) -> AsyncIterator[Broker]:
    async with open_broker() as b:
        yield b
