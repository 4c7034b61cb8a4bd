"""Where the broker's queue list comes from, and the message when it cannot be had.

The management plugin is not enabled on the shared test broker (and must not be reconfigured),
so the API call is checked against a local HTTP server answering as the plugin does.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from brokerjobs.broker_queues import MANAGEMENT_ENV, ListingUnavailable, list_queues
from brokerjobs.topology_diff import BrokerQueue

ROWS = [{"name": "a.retry.5s", "arguments": {"x-message-ttl": 5000}, "messages": 2}]


class _Plugin(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization", "")))
        body = json.dumps(ROWS).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def plugin() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Plugin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(5)


async def test_the_management_api_is_asked_for_the_urls_vhost_with_its_credentials(
    plugin: str,
) -> None:
    _Plugin.seen.clear()
    found = await list_queues(
        "amqp://ops:s%23cret@rabbit.internal:5672/prod%2Feu", {MANAGEMENT_ENV: plugin}
    )
    assert found == [BrokerQueue("a.retry.5s", 2, {"x-message-ttl": 5000})]
    ((path, auth),) = _Plugin.seen
    assert path == "/api/queues/prod%2Feu?columns=name,arguments,messages"
    assert base64.b64decode(auth.removeprefix("Basic ")) == b"ops:s#cret"


async def test_without_a_management_url_a_remote_broker_cannot_be_listed() -> None:
    with pytest.raises(ListingUnavailable) as caught:
        await list_queues("amqp://ops:secret@rabbit.internal:5672/", {})
    text = str(caught.value)
    assert "AMQP has no way to" in text
    assert f"{MANAGEMENT_ENV}=http://user:password@rabbit.internal:15672" in text
    assert "secret" not in text


async def test_a_local_node_on_another_port_is_not_the_one_rabbitmqctl_reaches() -> None:
    with pytest.raises(
        ListingUnavailable,
        match="rabbitmqctl (reaches the node on port 5672, not 5679|is not on PATH)",
    ):
        await list_queues("amqp://guest:guest@127.0.0.1:5679/", {})
