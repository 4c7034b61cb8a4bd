"""A failover TCP proxy in front of the throwaway cluster's nodes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence


class FailoverProxy:
    """A loopback TCP proxy that sends each new connection to the first node that accepts it.

    brokerjobs takes one broker URL; in production a load balancer or a Kubernetes Service in
    front of the cluster plays this part. Open connections are not moved: when their node dies
    they break, and the client's own reconnect lands on a live node.
    """

    def __init__(self, upstream_ports: Sequence[int]) -> None:
        self.upstream_ports = list(upstream_ports)
        self.port = 0
        self.connections = 0
        self.picked: list[int] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio logs a cancelled connection callback as an error: end quietly instead.
        with contextlib.suppress(asyncio.CancelledError):
            await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = None
        for port in self.upstream_ports:
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
            except (OSError, TimeoutError):
                continue
            self.picked.append(port)
            break
        if upstream is None:
            writer.close()
            return
        self.connections += 1
        up_reader, up_writer = upstream
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        for pipe in pipes:
            self._tasks.add(pipe)
            pipe.add_done_callback(self._tasks.discard)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
