"""BROKERJOBS_URL pointing at a server that speaks another protocol (an AMQP 1.0 broker, a
RabbitMQ port for another AMQP version) is a clear error naming the URL, not a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What such a server sends back to an AMQP 0-9-1 client's protocol header, then closes.
HEADERS = {
    "amqp-1.0": b"AMQP\x00\x01\x00\x00",
    "amqp-1.0-sasl": b"AMQP\x03\x01\x00\x00",
    "amqp-0-8": b"AMQP\x01\x01\x08\x00",
}


@contextlib.asynccontextmanager
async def foreign_server(reply: bytes) -> AsyncIterator[int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(reply)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("command", [["worker", "examples.demo:app"], ["parked", "list", "q"]])
@pytest.mark.parametrize("reply", list(HEADERS.values()), ids=list(HEADERS))
async def test_a_server_speaking_another_protocol_is_a_clear_error(
    command: list[str], reply: bytes
) -> None:
    async with foreign_server(reply) as port:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERJOBS_")}
        env.update(
            BROKERJOBS_URL=f"amqp://guest:s3cret@127.0.0.1:{port}/",
            BROKERJOBS_CONNECT_TIMEOUT="1",
        )
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "brokerjobs.cli", *command,
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(child.communicate(), 60)
    stderr = err.decode()
    assert child.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert f"cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:{port}/" in stderr
    assert "another protocol than AMQP 0-9-1" in stderr
