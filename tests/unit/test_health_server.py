"""The probe server under hostile clients: garbage, resets, floods; where it binds; its errors."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brokerjobs import ConfigError
from brokerjobs.health import MAX_PENDING, HealthServer
from brokerjobs.settings import load_settings


@asynccontextmanager
async def serving(request_timeout: float = 5.0) -> AsyncIterator[HealthServer]:
    server = HealthServer(lambda: True, lambda: {}, request_timeout=request_timeout)
    await server.start(0)
    try:
        yield server
    finally:
        await server.stop()


async def ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def test_the_probe_port_binds_to_loopback_unless_told() -> None:
    assert load_settings().health_host == "127.0.0.1"


async def test_a_port_in_use_is_one_error_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="BROKERJOBS_HEALTH_PORT"):
            await HealthServer(lambda: True, lambda: {}).start(port)
    with pytest.raises(ConfigError, match="BROKERJOBS_HEALTH_HOST"):
        await HealthServer(lambda: True, lambda: {}).start(0, "256.1.1.1")


async def test_a_client_resetting_before_its_answer_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving() as server:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            # closed with linger 0: an RST, before the server has read the request
        answer = await ask(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_flood_of_idle_connections_drops_the_oldest_and_probes_still_answer() -> None:
    # A request timeout far beyond the test's deadline: only the eviction can close the first.
    async with serving(request_timeout=600) as server:
        loop = asyncio.get_running_loop()
        idle = []
        try:
            for _ in range(MAX_PENDING + 20):
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", server.port))
                idle.append(sock)
            answer = await ask(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
            assert answer.startswith(b"HTTP/1.0 200")
            first = await asyncio.wait_for(loop.sock_recv(idle[0], 1), 10)
            assert first == b""  # closed by the server, not by its request timeout
        finally:
            for sock in idle:
                sock.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(garbage=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_garbage_gets_an_answer_or_a_close_and_the_server_keeps_answering(garbage: bytes) -> None:
    async def scenario() -> None:
        async with serving(request_timeout=1) as server:
            answer = await ask(server.port, garbage + b"\r\n\r\n")
            assert answer == b"" or answer.startswith(b"HTTP/1.0 ")
            ok = await ask(server.port, b"GET /readyz HTTP/1.0\r\n\r\n")
            assert ok.startswith(b"HTTP/1.0 200")

    asyncio.run(scenario())


async def test_the_health_command_probes_the_address_the_worker_listens_on() -> None:
    server = HealthServer(lambda: True, lambda: {})
    await server.start(0, "127.0.0.2")  # a loopback address that is not 127.0.0.1
    try:
        env = {**os.environ, "BROKERJOBS_HEALTH_HOST": "127.0.0.2"}
        command = ["-m", "brokerjobs.cli", "health", "--port", str(server.port)]
        process = await asyncio.create_subprocess_exec(
            sys.executable, *command, env=env, stdout=asyncio.subprocess.PIPE
        )
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await server.stop()
    assert (process.returncode, output) == (0, b"/readyz: ok\n")
