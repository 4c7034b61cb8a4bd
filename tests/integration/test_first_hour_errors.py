"""Mistakes a new user makes get an error that names what is wrong and the fix, at once, and
never the password."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from pydantic import BaseModel

from brokerjobs import BrokerUnreachable, ConfigError, job
from brokerjobs.broker.amqp import connect
from brokerjobs.errors import TopologyError
from brokerjobs.publisher import Publisher
from brokerjobs.settings import load_settings
from tests.support.broker import TEST_URL, make_settings, unique

SECRET = "s3cr3t-pw"


@job("first.hour")
class FirstHour(BaseModel):
    n: int


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"amqp://guest:{SECRET}@127.0.0.1:56x2/", "invalid port"),
        (f"amqp://guest:{SECRET}@127.0.0.1:99999/", "invalid port"),
        (f"amqp://guest:{SECRET}#x@127.0.0.1/", "percent-encode"),
        (f"amqp://guest:{SECRET}?x@127.0.0.1/", "percent-encode"),
        (f"amqp://guest:{SECRET}/x@127.0.0.1/", "percent-encode"),
        (f"http://guest:{SECRET}@127.0.0.1/", "must start with amqp://"),
    ],
)
def test_a_malformed_url_is_a_clear_error_without_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(url=url)
    assert says in str(caught.value)
    assert SECRET not in str(caught.value)


def test_tls_files_with_a_plain_amqp_url_are_an_error(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="uses amqp:// \\(plain text\\)"):
        load_settings(url="amqp://h/", tls_ca_file=str(ca))
    with pytest.raises(ConfigError, match="TLS files cannot be loaded"):
        load_settings(url="amqps://h/", tls_ca_file=str(ca))


async def test_a_missing_vhost_fails_at_once_and_says_so() -> None:
    parts = urlsplit(TEST_URL)
    url = urlunsplit(parts._replace(path="/no-such-vhost"))
    settings = make_settings(url=url, connect_timeout=30)
    async with asyncio.timeout(10):  # not 30 s of retries
        with pytest.raises(BrokerUnreachable) as caught:
            await connect(settings, "test")
    assert "virtual host 'no-such-vhost'" in str(caught.value)
    assert "rabbitmqctl" in str(caught.value)


async def test_publishing_to_an_undeclared_exchange_says_so_at_once() -> None:
    exchange = unique("noexchange")
    async with asyncio.timeout(10), Publisher(make_settings(), exchange=exchange) as publisher:
        with pytest.raises(TopologyError) as caught:
            await publisher.publish(FirstHour(n=1))
    assert f"exchange {exchange!r} does not exist" in str(caught.value)
    assert "brokerjobs topology declare" in str(caught.value)


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[int]:
    """A TLS listener with a self-signed certificate no client trusts."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=untrusted.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def test_a_certificate_that_fails_verification_fails_fast_with_the_reason(
    tls_server: int,
) -> None:
    settings = make_settings(
        url=f"amqps://guest:{SECRET}@127.0.0.1:{tls_server}/", connect_timeout=30
    )
    async with asyncio.timeout(10):
        with pytest.raises(BrokerUnreachable) as caught:
            await connect(settings, "test")
    assert "failed verification" in str(caught.value)
    assert "self-signed" in str(caught.value) or "certificate" in str(caught.value)
    assert SECRET not in str(caught.value)
