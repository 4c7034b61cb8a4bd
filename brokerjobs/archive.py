"""The export format of parked jobs: lossless JSON Lines (body, properties, typed headers).

AMQP header tables hold bytes, timestamps, decimals and nested tables that JSON lacks; each is
written as a one-key object (``{"$bytes": base64}``, ``{"$datetime": iso}``, ``{"$decimal": s}``,
``{"$table": {...}}``) so that an import restores exactly what was exported.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from brokerjobs import envelope as wire
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.errors import ParkingError


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as source:
        for number, line in enumerate(source, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ParkingError(f"{path}:{number} is not JSON: {exc}") from None


def write_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")


def _tag(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, dict):
        return {"$table": {k: _tag(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return [_tag(v) for v in value]
    return value


def _untag(value: Any) -> Any:
    if isinstance(value, list):
        return [_untag(v) for v in value]
    if isinstance(value, dict):
        if "$bytes" in value:
            return base64.b64decode(value["$bytes"])
        if "$datetime" in value:
            return datetime.fromisoformat(value["$datetime"])
        if "$decimal" in value:
            return Decimal(value["$decimal"])
        return {k: _untag(v) for k, v in value["$table"].items()}
    return value


def to_record(delivery: Delivery) -> dict[str, Any]:
    return {
        "message_id": delivery.message_id,
        "type": delivery.job_name,
        "body": base64.b64encode(delivery.body).decode(),
        "content_type": delivery.content_type,
        "priority": delivery.priority,
        "timestamp": delivery.timestamp.isoformat() if delivery.timestamp else None,
        "correlation_id": delivery.correlation_id,
        "app_id": delivery.app_id,
        "persistent": delivery.persistent,
        "headers": {k: _tag(v) for k, v in delivery.headers.items()},
    }


def from_record(record: Mapping[str, Any]) -> OutgoingMessage:
    try:
        timestamp = record.get("timestamp")
        return OutgoingMessage(
            body=base64.b64decode(record["body"]),
            message_id=record["message_id"] or wire.new_job_id(),
            job_name=record.get("type"),
            priority=record.get("priority") or 0,
            headers={k: _untag(v) for k, v in record.get("headers", {}).items()},
            timestamp=datetime.fromisoformat(timestamp) if timestamp else None,
            content_type=record.get("content_type"),
            correlation_id=record.get("correlation_id"),
            app_id=record.get("app_id"),
            persistent=record.get("persistent", True),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ParkingError(f"not a brokerjobs export record: {exc!r}") from None
