"""Hostile settings values: every one is a ConfigError naming the fix, never the password."""

from __future__ import annotations

import math
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from brokerjobs import ConfigError
from brokerjobs.redact import redact_url
from brokerjobs.settings import Settings, load_settings

SECRET = "Zq9SECRETpw"
_URL_CHARS = st.sampled_from(list("@:/%?#[]. ,a1\\\t\n\x00\udcffé"))


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    before=st.text(_URL_CHARS, max_size=4),
    after=st.text(_URL_CHARS, max_size=4),
    host=st.text(_URL_CHARS, max_size=6),
    scheme=st.sampled_from(["amqp", "amqps", "AMQP", "http", ""]),
    port=st.sampled_from(["", ":0", ":5672", ":x", ":99999", ":"]),
    at=st.sampled_from(["@", ""]),  # without '@' the password reads as a port
)
def test_no_url_shows_its_password_or_escapes_as_another_error(
    before: str, after: str, host: str, scheme: str, port: str, at: str
) -> None:
    assume("@" not in before)  # else the secret would be the host, not the password
    url = f"{scheme}://u:{before}{SECRET}{after}{at}{host or 'h'}{port}/"
    try:
        loaded = load_settings(url=url)
    except ConfigError as exc:
        message = str(exc)
    else:
        message = ""
    assert SECRET not in message
    if message:
        return
    assert SECRET not in repr(loaded)
    if at:  # without '@' a URL has no password: what follows may be a path or a query
        assert SECRET not in loaded.safe_url
    for node in loaded.amqp_urls:  # what the connector gets: bytes and a host it can encode
        parts = urlsplit(node)
        assert node.encode() and parts.hostname and parts.hostname.encode("idna")
        assert parts.port != 0


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"amqp://u:{SECRET},x@127.0.0.1/", "%2C"),  # a ',' splits the node list
        (f"amqp://u:{SECRET},@://h/", "%2C"),
        (f"amqp://guest:{SECRET}/", "invalid port"),  # no '@': the password is the "port"
        (f"amqp://:{SECRET}", "no host"),
        (f"amqp://u:{SECRET}]@127.0.0.1/", "%5D"),
        (f"amqp://u:[{SECRET}@127.0.0.1/", "%5B"),
        (f"amqp://u:{SECRET}@127.0.0.1:0/", "invalid port"),  # aio-pika would take 5672
        (f"amqp://gu\udcffest:{SECRET}@127.0.0.1/", "not valid UTF-8"),  # yarl drops it
        (f"amqp://u:{SECRET}@{'a' * 64}.example/", "1 to 63 characters"),
    ],
)
def test_a_url_that_would_fail_later_or_silently_is_refused_at_load(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        load_settings(url=url)
    assert SECRET not in str(caught.value)


def test_an_ipv6_node_keeps_its_brackets_when_redacted() -> None:
    assert redact_url(f"amqp://u:{SECRET}@[::1]:5672/") == "amqp://u:***@[::1]:5672/"


_ODD_VALUES = st.sampled_from(
    ["nan", "inf", "-inf", "INF", "1e309", "-0", "0x10", "1_000", "٣", " 5 ", "1e-400", "9" * 5000]
)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    field=st.sampled_from(sorted(Settings.model_fields)),
    value=st.text(max_size=30).map(lambda v: v.replace("\x00", "")) | _ODD_VALUES,
)
def test_any_environment_value_is_a_config_error_or_a_finite_setting(
    field: str, value: str
) -> None:
    with pytest.MonkeyPatch.context() as env:
        for name in Settings.model_fields:
            env.delenv(f"BROKERJOBS_{name.upper()}", raising=False)
        env.setenv(f"BROKERJOBS_{field.upper()}", value)
        try:
            loaded = load_settings()
        except ConfigError:
            return
    setting = getattr(loaded, field)
    assert not isinstance(setting, float) or math.isfinite(setting)
