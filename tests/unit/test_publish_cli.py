"""``brokerjobs publish``'s validation: every payload checked first, errors name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from brokerjobs import App, job
from brokerjobs.cli_support import CliError, duration, load_app
from brokerjobs.errors import BrokerJobsError
from brokerjobs.publish_cli import (
    InvalidPayload,
    Payload,
    find_job,
    payloads_from_file,
    payloads_from_lines,
    validate,
)
from brokerjobs.settings import load_settings


@job("email.send")
class SendEmail(BaseModel):
    to: str
    retries: int = 0


def app() -> App:
    shop = App("shop")

    @shop.handler(SendEmail)
    async def send(_: SendEmail) -> None:
        pass

    return shop


def test_a_missing_field_is_named_with_the_line_it_is_on() -> None:
    payloads = payloads_from_lines(['{"to": "a"}', "", '{"retries": 1}'], "stdin")
    with pytest.raises(InvalidPayload) as caught:
        validate(find_job(app(), "email.send"), payloads)
    assert str(caught.value) == (
        "stdin line 3: does not match SendEmail (email.send): field 'to': Field required"
    )


def test_a_wrong_type_and_bad_json_are_named() -> None:
    spec = find_job(app(), "email.send")
    with pytest.raises(InvalidPayload, match="field 'retries': Input should be a valid integer"):
        validate(spec, [Payload("the JSON argument", '{"to": "a", "retries": "x"}')])
    with pytest.raises(InvalidPayload, match="the JSON argument: .*not valid JSON"):
        validate(spec, [Payload("the JSON argument", '{"to": ')])
    with pytest.raises(InvalidPayload, match="no payload given"):
        validate(spec, [])


def test_an_unknown_job_lists_the_apps_jobs() -> None:
    with pytest.raises(InvalidPayload, match=r"handles no job 'email\.sned' \(its jobs: email"):
        find_job(app(), "email.sned")


def test_a_file_is_one_document_or_json_lines(tmp_path: Path) -> None:
    document = tmp_path / "one.json"
    document.write_text('{\n  "to": "a"\n}\n')
    lines = tmp_path / "many.jsonl"
    lines.write_text('{"to": "a"}\n{"to": "b"}\n')
    spec = find_job(app(), "email.send")
    assert validate(spec, payloads_from_file(document)) == [SendEmail(to="a")]
    assert validate(spec, payloads_from_file(lines)) == [SendEmail(to="a"), SendEmail(to="b")]
    with pytest.raises(InvalidPayload, match="cannot read"):
        payloads_from_file(tmp_path / "absent.json")


@job("reading.record")
class Reading(BaseModel):
    value: float


def test_a_payload_that_would_not_survive_the_wire_is_refused() -> None:
    shop = App("meters")

    @shop.handler(Reading)
    async def record(_: Reading) -> None:
        pass

    spec = find_job(shop, "reading.record")
    for literal in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(InvalidPayload, match="not once sent as JSON"):
            validate(spec, [Payload("the JSON argument", f'{{"value": {literal}}}')])
    assert validate(spec, [Payload("the JSON argument", '{"value": 1e308}')])


@pytest.mark.parametrize("text", ["99999999999d", "1" * 400 + "s"])
def test_a_delay_too_long_for_timedelta_is_a_usage_error(text: str) -> None:
    with pytest.raises(CliError, match="longer than"):
        duration(text)


@pytest.mark.parametrize("path", ["../shop/jobs:app", ".jobs:app", "shop.jobs:", ":app"])
def test_an_app_path_that_is_no_module_name_says_so(path: str) -> None:
    with pytest.raises(BrokerJobsError, match="expected MODULE:APP"):
        load_app(path)


@job("tree.store")
class Tree(BaseModel):
    node: Any


def test_a_payload_beyond_the_workers_limits_is_refused_before_publishing() -> None:
    shop = App("forest")

    @shop.handler(Tree)
    async def store(_: Tree) -> None:
        pass

    spec = find_job(shop, "tree.store")
    limits = load_settings(max_body_bytes=1000, max_json_depth=10)
    deep = Payload("line 1", '{"node": ' + "[" * 20 + "]" * 20 + "}")
    with pytest.raises(InvalidPayload, match="deeper than 10 levels.*every worker would park"):
        validate(spec, [deep], limits)
    large = Payload("line 2", '{"node": "' + "x" * 2000 + '"}')
    with pytest.raises(InvalidPayload, match="exceed BROKERJOBS_MAX_BODY_BYTES"):
        validate(spec, [large], limits)
    assert validate(spec, [deep, large])  # without limits: only the model
