"""Container probes: ``/healthz`` (the event loop answers) and ``/readyz`` (consumers exist).

A tiny asyncio HTTP/1.0 responder, so probes need no web framework. Readiness is the worker's
own view: connected and a live consumer on every queue, so Kubernetes can restart a worker
that is connected but silently no longer consuming.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from brokerjobs.errors import ConfigError

MAX_REQUEST_BYTES = 8192
# Connections still sending their request; beyond this the oldest is dropped, so a flood of
# idle connections can neither use up the worker's file descriptors nor lock a probe out.
MAX_PENDING = 64


class HealthServer:
    def __init__(
        self,
        ready: Callable[[], bool],
        details: Callable[[], dict[str, Any]],
        request_timeout: float = 5.0,
    ):
        self._ready = ready
        self._details = details
        self._server: asyncio.Server | None = None
        self._started = time.monotonic()
        self._request_timeout = request_timeout
        self._pending: dict[asyncio.StreamWriter, None] = {}  # oldest first

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, port: int, host: str = "127.0.0.1") -> None:
        try:
            self._server = await asyncio.start_server(self._serve, host, port)
        except (OSError, UnicodeError) as exc:  # in use, not an address of this host, no name
            raise ConfigError(
                f"cannot serve health probes on {host!r} port {port} ({exc}): choose another "
                "BROKERJOBS_HEALTH_PORT, or a BROKERJOBS_HEALTH_HOST of this host"
            ) from None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._pending:
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._pending) >= MAX_PENDING:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            oldest.transport.abort()
        self._pending[writer] = None
        try:
            try:
                async with asyncio.timeout(self._request_timeout):
                    request = await reader.readuntil(b"\r\n\r\n")
            finally:
                self._pending.pop(writer, None)
            path = request[:MAX_REQUEST_BYTES].split(b" ", 2)[1].decode("ascii", "replace")
            status, body = self._answer(path)
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            IndexError,
            ConnectionError,  # the client hung up (or reset) before its answer was out
        ):
            pass
        finally:
            writer.close()

    def _answer(self, path: str) -> tuple[str, bytes]:
        path = path.split("?", 1)[0]
        if path == "/healthz":
            uptime = round(time.monotonic() - self._started, 1)
            return "200 OK", json.dumps({"status": "alive", "uptime_s": uptime}).encode()
        if path == "/readyz":
            ready = self._ready()
            body = json.dumps({"ready": ready, **self._details()}).encode()
            return ("200 OK" if ready else "503 Service Unavailable"), body
        return "404 Not Found", b'{"error": "try /healthz or /readyz"}'


def probe(port: int, path: str = "/readyz", host: str = "127.0.0.1", timeout: float = 3.0) -> bool:
    """True when the endpoint answers 200 (for ``brokerjobs health`` and exec probes)."""
    import urllib.error  # only the probe command needs an HTTP client
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
