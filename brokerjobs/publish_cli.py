"""``brokerjobs publish``: validate JSON payloads against a job's model, then publish with confirms.

Every payload is validated before the first is published: one bad line publishes nothing
(exit 2); a broker or publish failure (e.g. unroutable) is exit 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import click
from pydantic import BaseModel, ValidationError

from brokerjobs.app import App
from brokerjobs.cli_support import (
    CliError,
    Duration,
    Exit,
    app_argument,
    examples,
    load_app,
    run,
    start,
)
from brokerjobs.errors import BrokerJobsError
from brokerjobs.jobs import JobSpec
from brokerjobs.settings import Settings
from brokerjobs.validation import json_limit_problem


class InvalidPayload(BrokerJobsError):
    """A payload is not valid JSON or does not match the job's model: nothing was published."""


@dataclass(frozen=True, slots=True)
class Payload:
    where: str  # "argument", "line 3", "file x.json"
    text: str


def find_job(app: App, name: str) -> JobSpec:
    """The job type the app handles under ``name``; the error lists the ones it has."""
    jobs = {spec.name: spec for queue in app.queues for spec in app.jobs(queue).values()}
    if name in jobs:
        return jobs[name]
    known = ", ".join(sorted(jobs)) or "none"
    raise InvalidPayload(f"app {app.name!r} handles no job {name!r} (its jobs: {known})")


def payloads_from_lines(lines: Iterable[str], source: str) -> list[Payload]:
    """JSON Lines: one payload per non-blank line."""
    return [
        Payload(f"{source} line {number}", line)
        for number, line in enumerate(lines, 1)
        if line.strip()
    ]


def validate(
    spec: JobSpec, payloads: Iterable[Payload], limits: Settings | None = None
) -> list[BaseModel]:
    """Every payload as the job's model, or InvalidPayload naming the place and the field;
    with ``limits``, also within the body limits workers with those settings enforce."""
    jobs: list[BaseModel] = []
    for payload in payloads:
        try:
            job = spec.model.model_validate_json(payload.text)
        except ValidationError as exc:
            raise InvalidPayload(f"{payload.where}: {_problems(spec, exc)}") from None
        body = job.__pydantic_serializer__.to_json(job)
        try:  # what the worker will validate: NaN and Infinity, for one, go out as null
            spec.model.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidPayload(
                f"{payload.where}: valid, but not once sent as JSON (NaN or Infinity become "
                f"null), so every worker would park it: {_problems(spec, exc)}"
            ) from None
        problem = _limit_problem(body, limits) if limits is not None else None
        if problem:
            raise InvalidPayload(f"{payload.where}: {problem}, so every worker would park it")
        jobs.append(job)
    if not jobs:
        raise InvalidPayload("no payload given")
    return jobs


def _limit_problem(body: bytes, limits: Settings) -> str | None:
    if len(body) > limits.max_body_bytes:
        return f"{len(body)} bytes exceed BROKERJOBS_MAX_BODY_BYTES ({limits.max_body_bytes})"
    return json_limit_problem(body, limits.max_json_depth, limits.max_json_number_digits)


def _problems(spec: JobSpec, exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        if error["type"] == "json_invalid":
            parts.append(f"not valid JSON ({error['msg']})")
            continue
        field = ".".join(str(p) for p in error["loc"]) or "(the payload)"
        parts.append(f"field {field!r}: {error['msg']}")
    return f"does not match {spec.model.__name__} ({spec.name}): " + "; ".join(parts)


async def publish(
    app: App,
    settings: Settings,
    jobs: list[BaseModel],
    *,
    priority: int | None = None,
    delay: float | None = None,
    confirmed: Callable[[str], None] | None = None,
) -> list[str]:
    """Publish ``jobs`` in order, each confirmed (then ``confirmed(job_id)``); their ids."""
    from brokerjobs.publisher import Publisher

    ids: list[str] = []
    async with Publisher.for_app(app, settings) as publisher:
        for job in jobs:
            ids.append(await publisher.publish(job, priority=priority, delay=delay))
            if confirmed is not None:
                confirmed(ids[-1])
    return ids


def payloads_from_file(path: Path) -> list[Payload]:
    """One JSON document, or JSON Lines (one payload per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"cannot read {path}: {exc}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and not lines[0].rstrip().endswith("}"):
        return [Payload(str(path), text)]  # a pretty-printed document
    return payloads_from_lines(text.splitlines(), str(path))


_EXAMPLES = examples(
    "brokerjobs publish shop.jobs:app email.send "
    """'{"to": "a@example.com", "subject": "hi"}'""",
    "brokerjobs publish shop.jobs:app email.send --file jobs.jsonl --priority 5",
    "jq -c '.[]' jobs.json | brokerjobs publish shop.jobs:app email.send - --delay 10m",
)


@click.command("publish", short_help="validate and publish jobs from a shell", epilog=_EXAMPLES)
@app_argument
@click.argument("job", metavar="JOB_NAME", help="the job's name, e.g. email.send")
@click.argument(
    "payload",
    required=False,
    metavar="[JSON]",
    help="the job as a JSON object; '-' reads JSON Lines from stdin",
)
@click.option(
    "--file",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="F",
    help="read the payload from F: one JSON object, or JSON Lines",
)
@click.option("--priority", type=click.IntRange(0, 255), metavar="N", help="per-message priority")
@click.option(
    "--delay",
    type=Duration(),
    metavar="D",
    help="hold the job in the broker first, e.g. 30s, 10m (the app needs delay_levels)",
)
def publish_command(
    app: str,
    job: str,
    payload: str | None,
    file: Path | None,
    priority: int | None,
    delay: timedelta | None,
) -> int:
    """Validate JSON payloads against the job's model (nothing is published if any is
    invalid), then publish each with a broker confirm and print its job id."""
    settings = start()
    return run(_publish(app, settings, job, (payload, file), priority, delay))


def read_payloads(payload: str | None, file: Path | None) -> list[Payload]:
    if (payload is None) == (file is None):
        raise InvalidPayload("give the payload as a JSON argument, '-' for stdin, or --file F")
    if file is not None:
        return payloads_from_file(file)
    if payload == "-":
        return payloads_from_lines(sys.stdin, "stdin")
    return [Payload("the JSON argument", payload or "")]


async def _publish(
    path: str,
    settings: Settings,
    name: str,
    given: tuple[str | None, Path | None],
    priority: int | None,
    delay: timedelta | None,
) -> int:
    app = load_app(path)
    try:
        jobs = validate(find_job(app, name), read_payloads(*given), settings)
        if delay is not None and not app.delay_levels:
            raise InvalidPayload(
                f"app {app.name!r} has no delay levels: --delay needs App(..., delay_levels=N)"
            )
    except InvalidPayload as exc:
        raise CliError(f"{exc}; nothing was published", Exit.USAGE) from None
    seconds = delay.total_seconds() if delay is not None else None
    # click.echo flushes: each id is printed as soon as the broker confirmed its job
    await publish(app, settings, jobs, priority=priority, delay=seconds, confirmed=click.echo)
    return Exit.OK
