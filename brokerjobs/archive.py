"""The export file of parked jobs: versioned, checksummed, lossless JSON Lines.

Line 1 is ``{"format": "brokerjobs-parked", "version": 2}``, then one record per job, then
``{"end": true, "count": N, "sha256": HEX}`` over the record lines (each with its newline): a
truncated, edited or reordered file fails the import before anything is published.

A record holds the body (base64), every AMQP property that was present, and the headers with
their AMQP types, so an import publishes what was exported, byte for byte. Header values that
JSON has (strings, booleans, null, arrays) are written as they are; every other one is a one-key
object named for its AMQP type letter: ``{"$l": 5}`` (integers by width: b B s u I i l L),
``{"$d": "0x1.999999999999ap-4"}`` and ``{"$f": ...}`` (``float.hex``), ``{"$D": "1.25"}``,
``{"$x": base64}`` (byte array), ``{"$S": base64}`` (a long string that is not UTF-8),
``{"$T": seconds}`` and ``{"$F": {...}}`` (a table). A plain JSON number imports as an integer
of the narrowest type, or a 64-bit double.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from brokerjobs import amqp_types as at
from brokerjobs import amqp_values as av
from brokerjobs.envelope import Delivery
from brokerjobs.errors import ParkingError

FORMAT = "brokerjobs-parked"
VERSION = 2
_PROPERTIES = tuple(name for name in av.PROPERTY_NAMES if name != "headers")
# A quorum queue's count of deliveries: every scan that returns a message raises it, so a record
# with it would never match the export it came from (purge --expect-checksum would always refuse).
# No copy carries it (envelope.BROKER_DEATH_HEADERS).
_REDELIVERIES = "x-delivery-count"


@dataclass(frozen=True, slots=True)
class Summary:
    """What an export file holds: its record count and the sha256 of its record lines."""

    count: int
    sha256: str


class Digest:
    """Count and sha256 of record lines, as export writes them and import and purge check."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def add(self, line: bytes) -> None:
        self._hash.update(line)
        self.count += 1

    def summary(self) -> Summary:
        return Summary(self.count, self._hash.hexdigest())


# -- typed values <-> JSON -------------------------------------------------------------------


def _tag(value: Any) -> Any:
    for kind in type(value).__mro__:  # the most specific type first: bool before int
        tagger = _TAGGERS.get(kind)
        if tagger is not None:
            return tagger(value)
    if isinstance(value, Mapping):
        return _TAGGERS[dict](value)
    raise at.UnencodableError(f"{type(value).__name__} is not an AMQP field type")


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


_TAGGERS: dict[type, Callable[[Any], Any]] = {
    str: lambda value: value,
    bool: lambda value: value,
    type(None): lambda value: value,
    at.TypedInt: lambda value: {f"${value.tag.decode()}": int(value)},
    at.Timestamp: lambda value: {"$T": int(value)},
    datetime: lambda value: {"$T": at.timestamp_seconds(value)},
    int: lambda value: value,
    at.Float32: lambda value: {"$f": float(value).hex()},
    float: lambda value: {"$d": value.hex()},
    Decimal: lambda value: {"$D": str(value)},
    at.LongString: lambda value: {"$S": _b64(value)},
    bytes: lambda value: {"$x": _b64(value)},
    bytearray: lambda value: {"$x": _b64(value)},
    dict: lambda value: {"$F": {str(k): _tag(v) for k, v in value.items()}},
    list: lambda value: [_tag(v) for v in value],
    tuple: lambda value: [_tag(v) for v in value],
}


def _untag_typed(tag: str, raw: Any) -> Any:
    if tag in _INTS:
        return _INTS[tag](raw)
    decoder = _UNTAG.get(tag)
    if decoder is None:
        raise ValueError(f"unknown value tag ${tag}")
    return decoder(raw)


_INTS = {t.tag.decode(): t for t in at.INT_TYPES.values()}
_UNTAG: dict[str, Callable[[Any], Any]] = {
    "f": lambda raw: at.Float32(float.fromhex(raw)),
    "d": float.fromhex,
    "D": Decimal,
    "S": lambda raw: at.LongString(base64.b64decode(raw, validate=True)),
    "x": lambda raw: base64.b64decode(raw, validate=True),
    "T": lambda raw: at.timestamp_value(int(raw)),
    "F": lambda raw: {k: _untag(v) for k, v in raw.items()},
}


def _untag(value: Any) -> Any:
    if isinstance(value, list):
        return [_untag(v) for v in value]
    if isinstance(value, dict):
        if len(value) != 1 or not next(iter(value)).startswith("$"):
            raise ValueError(f"a table must be written as {{'$F': ...}}, not {value!r:.60}")
        [(key, raw)] = value.items()
        return _untag_typed(key[1:], raw)
    return value


# -- records ---------------------------------------------------------------------------------


def to_record(delivery: Delivery) -> dict[str, Any]:
    """The JSON record of one parked message; raises ParkingError naming the job."""
    properties = {
        name: getattr(delivery, "job_name" if name == "type" else name) for name in _PROPERTIES
    }
    try:
        if properties["timestamp"] is not None:
            properties["timestamp"] = at.timestamp_seconds(properties["timestamp"])
        headers = {k: _tag(v) for k, v in delivery.headers.items() if k != _REDELIVERIES}
    except at.UnencodableError as exc:
        raise ParkingError(f"job {delivery.message_id}: cannot be exported: {exc}") from None
    return {
        "id": delivery.message_id,
        "body": base64.b64encode(delivery.body).decode(),
        "properties": {k: v for k, v in properties.items() if v is not None},
        "headers": headers,
    }


def record_line(delivery: Delivery) -> bytes:
    """One record as export writes it (and as purge --expect-checksum hashes it)."""
    text = json.dumps(to_record(delivery), separators=(",", ":"), allow_nan=False)
    return (text + "\n").encode()


def from_record(record: Mapping[str, Any]) -> Delivery:
    """The parked message a record describes; raises ParkingError for a malformed one."""
    try:
        properties = dict(record.get("properties", {}))
        unknown = set(properties) - set(_PROPERTIES)
        if unknown:
            raise ValueError(f"unknown properties {sorted(unknown)}")
        if "timestamp" in properties:
            properties["timestamp"] = at.timestamp_value(int(properties["timestamp"]))
        properties["job_name"] = properties.pop("type", None)
        return Delivery(
            body=base64.b64decode(record["body"], validate=True),
            delivery_tag=0,
            exchange="",
            routing_key="",
            redelivered=False,
            headers={k: _untag(v) for k, v in record.get("headers", {}).items()},
            **properties,
        )
    except (KeyError, TypeError, ValueError, InvalidOperation, AttributeError) as exc:
        raise ParkingError(f"record {record.get('id')!r} is malformed: {exc!r}") from None


# -- files -----------------------------------------------------------------------------------


def write_export(path: Path, deliveries: Iterable[Delivery]) -> Summary:
    """All or nothing: written to a temporary file beside ``path``, synced, read back and
    verified, then renamed over ``path``. On any failure ``path`` is untouched and the
    temporary file removed; the ParkingError names the job whose record failed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        summary = _write(temporary, deliveries)
        if read_export(temporary)[1] != summary:
            raise ParkingError(f"{temporary} did not read back as written")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _sync_directory(path.parent)
    return summary


def _write(temporary: Path, deliveries: Iterable[Delivery]) -> Summary:
    digest = Digest()
    with temporary.open("wb") as out:
        out.write(_json_line({"format": FORMAT, "version": VERSION}))
        for delivery in deliveries:
            line = record_line(delivery)
            try:
                out.write(line)
            except OSError as exc:
                raise ParkingError(f"job {delivery.message_id}: cannot be written: {exc}") from None
            digest.add(line)
        summary = digest.summary()
        try:
            out.write(_json_line({"end": True, "count": summary.count, "sha256": summary.sha256}))
            out.flush()
            os.fsync(out.fileno())
        except OSError as exc:
            raise ParkingError(f"{temporary}: cannot finish the export: {exc}") from None
    return summary


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_line(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()


def read_export(path: Path) -> tuple[list[Delivery], Summary]:
    """Every record of an export file, after checking its format, count and checksum."""
    lines = _lines(path)
    first = _parse(path, 1, next(lines, b""))
    if first.get("format") != FORMAT or first.get("version") != VERSION:
        raise ParkingError(
            f"{path} is not a brokerjobs export of format version {VERSION} "
            f"(first line: {json.dumps(first)[:80]})"
        )
    digest, records, trailer = Digest(), [], None
    for number, line in enumerate(lines, 2):
        value = _parse(path, number, line)
        if trailer is not None:
            raise ParkingError(f"{path}:{number}: data after the end line")
        if value.get("end") is True:
            trailer = value
            continue
        digest.add(line)
        records.append(from_record(value))
    return records, _verified(path, digest.summary(), trailer)


def _verified(path: Path, found: Summary, trailer: Mapping[str, Any] | None) -> Summary:
    if trailer is None:
        raise ParkingError(f"{path} has no end line: the export is incomplete")
    expected = Summary(trailer.get("count", -1), trailer.get("sha256", ""))
    if found != expected:
        raise ParkingError(
            f"{path} holds {found.count} records (sha256 {found.sha256}) but its end line says "
            f"{expected.count} (sha256 {expected.sha256}): the file was changed or cut short"
        )
    return found


def _lines(path: Path) -> Iterator[bytes]:
    try:
        with path.open("rb") as source:
            yield from (line for line in source if line.strip())
    except OSError as exc:
        raise ParkingError(f"cannot read {path}: {exc}") from None


def _parse(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParkingError(f"{path}:{number} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ParkingError(f"{path}:{number} is not a JSON object")
    return value
