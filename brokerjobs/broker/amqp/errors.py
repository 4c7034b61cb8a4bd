"""Library errors, caught here and nowhere else: each becomes a ``brokerjobs.errors`` one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiormq.exceptions as amqp_errors

from brokerjobs.errors import BrokerJobsError, ConnectionLost

# Failures of the connection or channel underneath an operation; the operation may be retried.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    amqp_errors.AMQPConnectionError,
    amqp_errors.ChannelInvalidStateError,
    amqp_errors.ChannelClosed,
    ConnectionError,
    OSError,
)
CONNECT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, TimeoutError)


@contextmanager
def link_failures(what: str, closed: object = None) -> Iterator[None]:
    """Turn a failure of the link under ``what`` into ConnectionLost.

    ``closed`` (a callable) says whether the channel or connection is gone: aiormq fails
    operations on a dropped connection with RuntimeError or a bare Exception, which are then
    link failures too, not bugs.
    """
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise ConnectionLost(f"{what}: {type(exc).__name__}: {exc}") from exc
    except BrokerJobsError:
        raise
    except Exception as exc:
        if callable(closed) and closed():
            raise ConnectionLost(f"{what}: the connection was lost ({exc!r})") from exc
        raise
