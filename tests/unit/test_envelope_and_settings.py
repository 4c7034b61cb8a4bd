"""Wire decoding, settings validation, URL redaction, and the pinned public API."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import brokerjobs
from brokerjobs import ConfigError, job
from brokerjobs.envelope import Decoded, Delivery, Undecodable, decode, encode
from brokerjobs.errors import JobDefinitionError
from brokerjobs.jobs import spec_of
from brokerjobs.redact import redact_url
from brokerjobs.settings import load_settings


@job("user.welcome", priority=4, version=2)
class Welcome(BaseModel):
    user_id: int


JOBS = {"user.welcome": spec_of(Welcome)}


def delivery(body: bytes, **kw: object) -> Delivery:
    values: dict[str, object] = {
        "delivery_tag": 1,
        "exchange": "x",
        "routing_key": "user.welcome",
        "redelivered": False,
        "job_name": "user.welcome",
    }
    values.update(kw)
    return Delivery(body=body, **values)  # type: ignore[arg-type]


def test_encode_sets_the_documented_properties_and_headers() -> None:
    message = encode(Welcome(user_id=7))
    assert message.body == b'{"user_id":7}'
    assert message.job_name == "user.welcome"
    assert message.priority == 4
    assert message.persistent
    assert message.headers == {"bj-attempt": 1, "bj-schema-version": 2}
    assert len(message.message_id) == 32
    assert encode(Welcome(user_id=7), priority=9).priority == 9


def test_decode_round_trips_and_falls_back_to_the_routing_key() -> None:
    result = decode(delivery(b'{"user_id": 7}', job_name=None), JOBS, 1000)
    assert isinstance(result, Decoded)
    assert result.job == Welcome(user_id=7)


@pytest.mark.parametrize(
    ("body", "kw", "reason"),
    [
        (b'{"user_id":', {}, "malformed JSON"),
        (b'{"user_id": "x"}', {}, "does not match Welcome (user.welcome): user_id"),
        (b"\xff", {}, "not valid UTF-8"),
        (b"{}", {"job_name": "user.bye"}, "unknown job type 'user.bye'"),
        (b"{}", {"content_type": "application/x-pickle"}, "is not application/json"),
        (b"x" * 1001, {}, "exceeds the limit of 1000"),
    ],
)
def test_decode_explains_why_a_delivery_is_not_a_job(
    body: bytes, kw: dict[str, Any], reason: str
) -> None:
    result = decode(delivery(body, **kw), JOBS, 1000)
    assert isinstance(result, Undecodable)
    assert reason in result.reason


def test_attempt_header_tolerates_foreign_encodings() -> None:
    assert delivery(b"", headers={"bj-attempt": b"3"}).attempt == 3
    assert delivery(b"", headers={"bj-attempt": "x"}).attempt == 1
    assert delivery(b"").attempt == 1


def test_plain_models_and_bad_names_are_refused() -> None:
    class Plain(BaseModel):
        a: int

    with pytest.raises(JobDefinitionError, match="decorate it with @brokerjobs.job"):
        spec_of(Plain)
    with pytest.raises(JobDefinitionError, match="wildcards"):
        job("user.*")


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("amqp://bob:s3cret@host:5672/vh", "amqp://bob:***@host:5672/vh"),
        ("amqps://bob:s3cret@host/", "amqps://bob:***@host/"),
        ("amqp://host/", "amqp://host/"),
    ],
)
def test_redact_url_hides_the_password(url: str, safe: str) -> None:
    assert redact_url(url) == safe


def test_settings_errors_name_the_setting_and_never_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BROKERJOBS_URL", "redis://u:topsecret@h/")
    with pytest.raises(ConfigError, match="amqp:// or amqps://") as info:
        load_settings()
    assert "topsecret" not in str(info.value)
    monkeypatch.setenv("BROKERJOBS_URL", "amqp://u:p@h/")
    monkeypatch.setenv("BROKERJOBS_PREFETCH", "0")
    with pytest.raises(ConfigError, match="BROKERJOBS_PREFETCH: Input should be greater"):
        load_settings()
    with pytest.raises(ConfigError, match="settings: prefetch: Input should be greater"):
        load_settings(prefetch=-1)  # an argument is named as such
    monkeypatch.setenv("BROKERJOBS_PREFETCH", "5")
    settings = load_settings()
    assert settings.prefetch == 5
    assert "p@" not in repr(settings)


def test_tls_settings_build_a_verifying_context(tmp_path: Path) -> None:
    settings = load_settings(url="amqps://u:p@broker.example:5671/")
    context = settings.ssl_context()
    assert context is not None and context.check_hostname
    with pytest.raises(ConfigError, match="not a readable file"):
        load_settings(url="amqps://h/", tls_ca_file=str(tmp_path / "missing.pem"))


def test_consumer_timeout_warning() -> None:
    assert load_settings(job_timeout=60).consumer_timeout_problem() is None
    warning = load_settings(job_timeout=3600).consumer_timeout_problem()
    assert warning is not None and "consumer_timeout" in warning


def test_otlp_export_is_configured_from_the_standard_environment_variable() -> None:
    import subprocess
    import sys

    code = (
        "from brokerjobs.telemetry import configure_from_environment, Telemetry\n"
        "assert not configure_from_environment({})\n"
        "assert configure_from_environment({'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:9'})\n"
        "t = Telemetry(); print(t.tracing, t.metering)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["True", "True"]


def test_cached_property_encoding_is_byte_identical_to_encoding_each_message() -> None:
    from brokerjobs.broker.amqp.properties import encode_properties as _encode_properties
    from brokerjobs.broker.amqp.properties import properties as _properties

    first = encode(Welcome(user_id=1), headers={"traceparent": "00-abc-def-01"})
    second = encode(Welcome(user_id=2), headers={"traceparent": "00-abc-def-01"})
    second.timestamp = first.timestamp
    for message in (first, second):
        assert _properties(message).marshal() == _encode_properties(message, message.message_id)
    odd = encode(Welcome(user_id=3), message_id="x")
    assert _properties(odd).marshal() == _encode_properties(odd, "x")
    nested = encode(Welcome(user_id=4), headers={"x-death": [{"count": 1}]})
    assert _properties(nested).marshal() == _encode_properties(nested, nested.message_id)


def test_a_fresh_job_goes_out_exactly_as_pamqp_encoded_it() -> None:
    from pamqp.commands import Basic

    from brokerjobs.broker.amqp.properties import properties as _properties

    message = encode(Welcome(user_id=1))
    assert isinstance(message.timestamp, datetime)  # a fresh job's timestamp; for mypy
    expected = Basic.Properties(
        content_type=message.content_type,
        delivery_mode=2,
        priority=message.priority,
        message_id=message.message_id,
        timestamp=message.timestamp,
        message_type=message.job_name,
        headers=message.headers,
    )
    assert _properties(message).marshal() == expected.marshal()


def test_a_mistyped_variable_is_named_with_the_setting_it_resembles(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from brokerjobs.settings import unknown_variables

    problems = unknown_variables(
        {
            "BROKERJOBS_PREFECH": "10",
            "BROKERJOBS_COMPLETELY_ELSE": "1",
            "BROKERJOBS_PREFETCH": "10",  # a real setting
            "BROKERJOBS_TEST_URL": "amqp://h/",  # the test suite's own
            "OTHER_PREFETCH": "1",
        }
    )
    assert problems == {
        "BROKERJOBS_PREFECH": "is not a brokerjobs setting and is ignored; "
        "did you mean BROKERJOBS_PREFETCH?",
        "BROKERJOBS_COMPLETELY_ELSE": "is not a brokerjobs setting and is ignored",
    }

    monkeypatch.setenv("BROKERJOBS_JOB_TIMOUT", "5")
    with caplog.at_level("WARNING", logger="brokerjobs.settings"):
        settings = load_settings()
        load_settings()
    warnings = [r.getMessage() for r in caplog.records if "JOB_TIMOUT" in r.getMessage()]
    assert warnings == [
        "environment variable BROKERJOBS_JOB_TIMOUT is not a brokerjobs setting and is "
        "ignored; did you mean BROKERJOBS_JOB_TIMEOUT?"
    ]
    assert settings.job_timeout == 300.0


def test_the_version_matches_the_package_metadata() -> None:
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert brokerjobs.__version__ == pyproject["project"]["version"]
