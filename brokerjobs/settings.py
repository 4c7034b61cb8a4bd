"""One validated settings object, read from arguments and ``BROKERJOBS_*`` environment variables."""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from brokerjobs.errors import ConfigError
from brokerjobs.redact import redact_url

log = logging.getLogger("brokerjobs.settings")

ENV_PREFIX = "BROKERJOBS_"
# Read by brokerjobs' own test and benchmark scripts, not by the library.
DEVELOPMENT_VARIABLES = frozenset(
    {"BROKERJOBS_TEST_URL", "BROKERJOBS_BENCH_URL", "BROKERJOBS_REQUIRE_BROKER"}
)
_warned: set[str] = set()
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
# RabbitMQ default consumer_timeout (3.8.17+): a delivery unacked longer closes the channel.
BROKER_CONSUMER_TIMEOUT_DEFAULT_S = 1800.0

# Finite: an infinite grace or timeout is a drain, publish or connect that may never end.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Settings(BaseModel):
    """Everything a worker, publisher or operator tool needs to reach and use the broker.

    Fields not given explicitly come from ``BROKERJOBS_<FIELD>`` environment variables.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: SecretStr = SecretStr(DEFAULT_URL)
    prefetch: Annotated[int, Field(ge=1, le=65535)] = 100
    job_timeout: PositiveSeconds = 300.0
    shutdown_grace: PositiveSeconds = 30.0
    # aiormq declares a connection dead after (heartbeat + 1) * 3 s without a frame, checked
    # every heartbeat / 2 s: 5 s detects a silent peer in 18-20 s. RabbitMQ advises against
    # values below 5 s (false positives under load); its default, 60 s, takes over 3 minutes.
    heartbeat: Annotated[int, Field(ge=0, le=3600)] = 5
    connect_timeout: PositiveSeconds = 30.0
    # One attempt on one node: a node that accepts TCP and never answers must not use up the
    # whole connect_timeout, or the other nodes of the list are never tried.
    connect_attempt_timeout: PositiveSeconds = 5.0
    max_body_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024
    # Deeper or longer JSON is parked with the limit named (decoding never recurses past it).
    max_json_depth: Annotated[int, Field(ge=1, le=10_000)] = 64
    max_json_number_digits: Annotated[int, Field(ge=1, le=4300)] = 4300
    sync_workers: Annotated[int, Field(ge=1, le=1024)] = 8
    broker_consumer_timeout: PositiveSeconds = BROKER_CONSUMER_TIMEOUT_DEFAULT_S
    publish_window: Annotated[int, Field(ge=1, le=100_000)] = 1000
    # Confirms that stop coming (a wedged queue, a broker bug) must not hang publishes forever:
    # after this long without any while publishes wait (a blocked connection excepted), the
    # channel is dropped and its jobs count as "may or may not be stored".
    confirm_timeout: PositiveSeconds = 15.0
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    health_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    # Loopback unless asked: Kubernetes httpGet probes need "0.0.0.0" (deploy/k8s sets it).
    health_host: str = "127.0.0.1"

    @model_validator(mode="before")
    @classmethod
    def _read_environment(cls, data: Any) -> Any:
        # Our own few lines instead of pydantic-settings: it costs ~3 MiB of RSS per worker.
        given = dict(data) if isinstance(data, dict) else {}
        for name in cls.model_fields:
            value = os.environ.get(ENV_PREFIX + name.upper())
            if value and name not in given:  # an empty variable counts as unset
                given[name] = value
        return given

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        urls = _split_urls(value.get_secret_value())
        if not urls:
            raise ValueError("BROKERJOBS_URL is empty")
        if len(urls) > 1 and not all(_SCHEME.match(u) for u in urls):
            # Most likely a ',' in a password cut the URL in two: echo no part of it.
            raise ValueError(
                "BROKERJOBS_URL lists nodes separated by ',' and one part does not start with "
                "amqp:// or amqps://: percent-encode a ',' in a user or password as %2C"
            )
        for raw in urls:
            _check_one_url(raw)
        if len({urlsplit(u).scheme for u in urls}) > 1:
            raise ValueError("BROKERJOBS_URL mixes amqp:// and amqps:// nodes")
        return value

    @model_validator(mode="after")
    def _check_tls_files(self) -> Settings:
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            try:
                missing = path is not None and not path.is_file()
            except OSError:  # a name too long for the file system, say
                missing = True
            if missing:
                raise ValueError(f"BROKERJOBS_{name.upper()} {str(path)!r} is not a readable file")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "set both BROKERJOBS_TLS_CERT_FILE and BROKERJOBS_TLS_KEY_FILE, or neither"
            )
        tls_files = self.tls_ca_file or self.tls_cert_file
        if tls_files and not self.uses_tls:
            # An error, not a warning: TLS was asked for, and plain text would be sent instead.
            raise ValueError(
                "BROKERJOBS_TLS_* files are set but BROKERJOBS_URL uses amqp:// (plain text): "
                "use amqps:// (port 5671) or unset the TLS files"
            )
        if tls_files:
            try:
                self.ssl_context()
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"the TLS files cannot be loaded: {exc}") from None
        return self

    @property
    def amqp_urls(self) -> list[str]:
        """Every node to try, in order (BROKERJOBS_URL may list several, comma-separated)."""
        return _split_urls(self.url.get_secret_value())

    @property
    def amqp_url(self) -> str:
        return self.amqp_urls[0]

    @property
    def safe_url(self) -> str:
        return ",".join(redact_url(u) for u in self.amqp_urls)

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.amqp_url).scheme == "amqps"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context for amqps URLs (system CAs unless a CA file is given)."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(
            cafile=str(self.tls_ca_file) if self.tls_ca_file else None
        )
        if self.tls_cert_file and self.tls_key_file:
            context.load_cert_chain(str(self.tls_cert_file), str(self.tls_key_file))
        return context

    def consumer_timeout_problem(self) -> str | None:
        """Why jobs may outlive the broker's consumer_timeout, else None."""
        if self.job_timeout < self.broker_consumer_timeout:
            return None
        return (
            f"job_timeout={self.job_timeout:g}s is not below the broker's consumer_timeout "
            f"({self.broker_consumer_timeout:g}s): RabbitMQ would close the channel and requeue "
            "every unacked job. Lower BROKERJOBS_JOB_TIMEOUT, or raise consumer_timeout on the "
            "broker and set BROKERJOBS_BROKER_CONSUMER_TIMEOUT to match."
        )


def _check_one_url(raw: str) -> None:
    # Never echo a URL that did not parse: its password may sit where no redaction looks.
    host = raw.rpartition("@")[2] if "@" in raw else _mask_after_colon(raw.partition("://")[2])
    try:
        parts = urlsplit(raw)
    except ValueError:  # its message quotes the netloc, password included
        raise ValueError(
            "BROKERJOBS_URL does not parse: '[' or ']' outside an IPv6 host; percent-encode "
            "them in a user or password (as %5B and %5D)"
        ) from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"BROKERJOBS_URL must start with amqp:// or amqps:// (host part {host!r})")
    if "@" in parts.path + parts.query + parts.fragment or parts.fragment:
        raise ValueError(
            "BROKERJOBS_URL does not parse: the user or password seems to contain '/', '?' or "
            "'#'; percent-encode them (/ as %2F, ? as %3F, # as %23, @ as %40)"
        )
    if not parts.hostname:
        raise ValueError(f"BROKERJOBS_URL has no host (host part {host!r})")
    try:
        raw.encode()  # bytes that are not UTF-8 (surrogates here) are dropped by yarl, silently
        parts.hostname.encode("idna")
    except UnicodeError:
        raise ValueError(
            f"BROKERJOBS_URL is not valid UTF-8 or its host is no host name (host part {host!r}): "
            "percent-encode other bytes of a user or password; each part of a host name is "
            "1 to 63 characters"
        ) from None
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # aio-pika would quietly take port 0 for the default, 5672
        raise ValueError(
            f"BROKERJOBS_URL has an invalid port in {host!r}: give a number from 1 to 65535"
        )


def _mask_after_colon(netloc: str) -> str:
    """``user:password`` (a URL without ``@``) shown as ``user:***``."""
    name, colon, _ = netloc.partition(":")
    return f"{name}:***" if colon else netloc


def _split_urls(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def unknown_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """``BROKERJOBS_*`` variables that are no setting (a typo is otherwise silently ignored),
    each with why: ``{name: "is not a brokerjobs setting ...; did you mean ...?"}``."""
    # Compared without the shared prefix, which would make every name look close.
    settings = [name.upper() for name in Settings.model_fields]
    problems = {}
    for name in sorted(environ):
        suffix = name.removeprefix(ENV_PREFIX)
        if suffix == name or suffix in settings or name in DEVELOPMENT_VARIABLES:
            continue
        hint = _did_you_mean(suffix, settings)
        problems[name] = f"is not a brokerjobs setting and is ignored{hint}"
    return problems


def _did_you_mean(suffix: str, settings: list[str]) -> str:
    import difflib  # here: a worker whose environment has no typo never loads it

    close = difflib.get_close_matches(suffix, settings, n=1)
    return f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus explicit overrides; errors name the fix.

    Unknown ``BROKERJOBS_*`` variables are logged as warnings, once per process.
    """
    for name, problem in unknown_variables(os.environ).items():
        if name not in _warned:
            _warned.add(name)
            log.warning("environment variable %s %s", name, problem)
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_source(error['loc'], given)}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"invalid brokerjobs settings: {problems}") from None


def _source(loc: tuple[int | str, ...], given: Mapping[str, object]) -> str:
    """Where a bad value came from: the environment variable, else the argument name."""
    field = str(loc[0]) if loc else ""
    variable = ENV_PREFIX + field.upper()
    if field and field not in given and os.environ.get(variable):
        return variable
    return ".".join(str(part) for part in loc) or "settings"
