"""Connecting to RabbitMQ: node rotation, backoff, and errors that name the fix.

Connections come from ``aio_pika.connect`` (URL parsing, TLS, client properties); the hot paths
use the underlying aiormq channel directly (``channel.py``). Reconnection is *not* aio-pika's
robust connection: the session supervisor reconnects, so a consumer never silently disappears.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq.exceptions as amqp_errors

from brokerjobs.broker.amqp.connection import Connection
from brokerjobs.broker.amqp.errors import CONNECT_ERRORS
from brokerjobs.errors import BrokerUnreachable
from brokerjobs.identity import process_identity
from brokerjobs.redact import redact_url
from brokerjobs.settings import Settings

log = logging.getLogger("brokerjobs.transport")

BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0


class _QuietConnectFailures(logging.Filter):
    """aiormq logs each failed TCP connect at ERROR; ``connect`` logs one WARNING per attempt
    (with what it tries next) instead, so one unreachable node is not a page of errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "error when creating transport: %r"


logging.getLogger("aiormq.connection").addFilter(_QuietConnectFailures())


class AmqpBroker:
    """The RabbitMQ broker of ``settings``: the default ``Broker`` of every component."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def connect(self, role: str) -> Connection:
        return await connect(self.settings, role)


class _Unreachable(Exception):
    """Internal: one failed connection attempt (the next node is tried)."""


def _url_with_heartbeat(url: str, heartbeat: int) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(heartbeat))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def connect(settings: Settings, role: str) -> Connection:
    """Connect to the first node of ``settings.amqp_urls`` that answers, for up to
    ``settings.connect_timeout`` seconds in all.

    Each attempt gets at most ``connect_attempt_timeout``: a node that accepts TCP and never
    answers (a blackhole, a partition) costs one attempt, then the next node is tried. Attempts
    rotate through every node, with exponential backoff and jitter between them. Wrong
    credentials fail at once; the password is never part of an error or a log line.
    """
    nodes = settings.amqp_urls
    properties = {"connection_name": f"brokerjobs {role} {process_identity()}"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.connect_timeout
    attempt = 0
    while True:
        node = nodes[attempt % len(nodes)]
        budget = min(settings.connect_attempt_timeout, max(deadline - loop.time(), 0.1))
        try:
            url = _url_with_heartbeat(node, settings.heartbeat)
            return Connection(
                await _connect_once(settings, url, properties, budget),
                confirm_timeout=settings.confirm_timeout,
            )
        except _Unreachable as exc:
            left = deadline - loop.time()
            if left <= 0:
                raise BrokerUnreachable(
                    f"cannot reach RabbitMQ at {settings.safe_url} after "
                    f"{settings.connect_timeout:g}s ({attempt + 1} attempt(s)): {exc}. "
                    "Is the broker running and BROKERJOBS_URL right?"
                ) from None
            pause = min(_backoff(attempt), left)
            attempt += 1
            log.warning(
                "connect to %s failed (%s); trying %s in %.1fs",
                redact_url(node), exc, redact_url(nodes[attempt % len(nodes)]), pause,
            )  # fmt: skip
            await asyncio.sleep(pause)


def _backoff(attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``: exponential from 0.2 s to 5 s, with jitter
    (0.5x-1x) so that workers cut off together do not reconnect in lockstep."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0**attempt)
    return ceiling * random.uniform(0.5, 1.0)


async def _connect_once(
    settings: Settings, url: str, properties: dict[str, Any], budget: float
) -> aio_pika.abc.AbstractConnection:
    try:
        async with asyncio.timeout(budget):
            raw = await aio_pika.connect(
                url,
                ssl_context=settings.ssl_context(),
                client_properties=properties,
                timeout=budget,
            )
    except (amqp_errors.ProbableAuthenticationError, amqp_errors.AuthenticationError):
        raise BrokerUnreachable(
            f"RabbitMQ at {settings.safe_url} refused the credentials: check the user and "
            "password in BROKERJOBS_URL and the user's permissions on the vhost"
        ) from None
    except TimeoutError:
        raise _Unreachable(f"no answer within {budget:g}s") from None
    except amqp_errors.InvalidFrameError as exc:
        if "Connection.Close" not in str(exc):
            raise _Unreachable(f"{type(exc).__name__}: {_describe(exc)}") from None
        raise BrokerUnreachable(_vhost_refused(settings, url)) from None
    except amqp_errors.ProtocolSyntaxError:
        # The server's first bytes were another protocol header: AMQP 1.0, or another version.
        raise _Unreachable("the server answered in another protocol than AMQP 0-9-1") from None
    except CONNECT_ERRORS as exc:
        refused = _certificate_error(exc)
        if refused is not None:  # retrying cannot help
            raise BrokerUnreachable(
                f"TLS: the certificate of RabbitMQ at {redact_url(url)} failed verification "
                f"({refused.verify_message}). Give the CA that signed it in "
                "BROKERJOBS_TLS_CA_FILE, or connect to the name the certificate is issued for."
            ) from None
        raise _Unreachable(f"{type(exc).__name__}: {_describe(exc)}") from None
    return raw


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure inside an error (aiormq wraps it in AMQPConnectionError)."""
    todo, seen = [exc], set()
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, ssl.SSLCertVerificationError):
            return error
        todo.extend(a for a in error.args if isinstance(a, BaseException))
        todo.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    return None


def _vhost_refused(settings: Settings, url: str) -> str:
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    user = unquote(parts.username or "guest")
    return (
        f"RabbitMQ at {settings.safe_url} refused to open virtual host {vhost!r} for user "
        f"{user!r}: it does not exist, or the user has no permission on it. Check the path in "
        f"BROKERJOBS_URL (`rabbitmqctl list_vhosts`), or grant access (`rabbitmqctl "
        f"set_permissions -p {vhost} {user} '.*' '.*' '.*'`)."
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    # aiormq sometimes puts the URL (with password) into connection errors.
    return "connection failed" if "@" in text else text or type(exc).__name__
