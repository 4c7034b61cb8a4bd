"""Fixtures: the real RabbitMQ is required; a missing broker fails the suite, never skips it.

At the end of the session every queue and exchange the run declared must be gone: the run
fails, listing them, if a test left any behind (``tests/support/hygiene.py``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import hygiene
from tests.support.broker import TEST_HOST, TEST_PORT, TEST_URL, Broker, open_broker
from tests.support.matrix import FORCED_KIND

_declared_log = Path(tempfile.mkdtemp(prefix="bjtest-")) / "declared.log"
# Set before any test starts a worker process, so that those record their declarations too.
os.environ[hygiene.LOG_ENV] = str(_declared_log)
hygiene.record_declarations()


def _broker_reachable() -> bool:
    try:
        with socket.create_connection((TEST_HOST, TEST_PORT), 3):
            return True
    except OSError:
        return False


def pytest_report_header() -> list[str]:
    kind = f", every app on {FORCED_KIND} queues" if FORCED_KIND else ""
    return [f"brokerjobs tests: broker {TEST_HOST}:{TEST_PORT}{kind}"]


@pytest.fixture(scope="session")
def _require_broker() -> None:
    if not _broker_reachable():
        pytest.fail(
            f"RabbitMQ is not reachable at {TEST_HOST}:{TEST_PORT}: "
            "run scripts/ensure-rabbitmq (integration tests never skip)",
            pytrace=False,
        )


@pytest.fixture
async def broker(_require_broker: None) -> AsyncIterator[Broker]:
    async with open_broker() as b:
        yield b


def pytest_sessionfinish(session: pytest.Session) -> None:
    names = hygiene.declared(_declared_log)
    if not names or not _broker_reachable():
        return
    leftovers = asyncio.run(hygiene.find_leftovers(TEST_URL, names))
    if not leftovers:
        return
    asyncio.run(hygiene.remove(TEST_URL, leftovers))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [
        f"the tests left {len(leftovers)} queue(s)/exchange(s) behind (now deleted); "
        "track every app with broker.track(app) after its handlers are registered:",
        *(f"  {item}" for item in leftovers),
    ]
    if reporter is None:
        print("\n".join(lines))
    else:
        reporter.write_line("")
        reporter.write_sep("=", "LEFTOVERS: the run fails", red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
