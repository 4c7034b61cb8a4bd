"""``python -m tests.support.broker_version``: the version the test broker reports about itself.

Read from the AMQP ``connection.start`` server properties, so it names the broker the tests
really talk to, whatever package is installed on the machine.
"""

from __future__ import annotations

import asyncio
import sys

import aiormq

from tests.support.broker import TEST_HOST, TEST_PORT, TEST_URL
from tests.support.matrix import FORCED_KIND


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def describe(url: str) -> str:
    connection = await aiormq.connect(url)
    try:
        props = connection.server_properties
    finally:
        await connection.close()
    product, version = _text(props.get("product", "?")), _text(props.get("version", "?"))
    platform = _text(props.get("platform", "?"))
    kind = f"; every app on {FORCED_KIND} queues" if FORCED_KIND else ""
    return f"broker: {product} {version} ({platform}) at {TEST_HOST}:{TEST_PORT}{kind}"


def main() -> int:
    try:
        print(asyncio.run(asyncio.wait_for(describe(TEST_URL), 30)), flush=True)
    except Exception as exc:  # any failure to ask is a failed step
        print(
            f"broker: cannot read the version at {TEST_HOST}:{TEST_PORT}: {exc!r}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
