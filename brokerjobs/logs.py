"""Structured log events with stable keys, and the text/JSON log setup."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from brokerjobs.envelope import Delivery
from brokerjobs.validation import printable

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def log_event(
    logger: logging.Logger,
    level: int,
    action: str,
    delivery: Delivery,
    queue: str,
    started: float,
    error: str | None = None,
    *,
    field: str = "error",
) -> None:
    """One event per job outcome: action, job, message_id, attempt, queue, duration_ms, and
    ``error`` (or, with ``field``, another name for that text: a skipped job's ``reason``)."""
    if not logger.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "action": action,
        "job": delivery.job_name or delivery.routing_key,
        "message_id": delivery.message_id,
        "attempt": delivery.attempt,
        "queue": queue,
        "duration_ms": round((time.monotonic() - started) * 1000, 2),
    }
    if error is not None:
        fields[field] = error
    logger.log(level, "%s %s %s", action, fields["job"], fields["message_id"], extra=fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    """One line per record (a traceback follows it): ids, job names and errors come from
    producers, and a newline or escape sequence in them must not forge or hide log lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        why = record.__dict__.get("error") or record.__dict__.get("reason")
        return printable(f"{line}: {why}" if why else line)


def configure_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiormq logs every connection error with the full URL; keep its noise at WARNING.
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
