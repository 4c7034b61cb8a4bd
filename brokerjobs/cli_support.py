"""What every ``brokerjobs`` command shares: exit codes, settings, errors for people, parameters.

Light on purpose: ``brokerjobs worker`` imports this and Click, never Rich (``cli_output``).
The exit codes are documented once, in docs/cli.md ("Exit codes").
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from enum import IntEnum
from typing import Any, TypeVar

import click

from brokerjobs.app import App
from brokerjobs.errors import BrokerJobsError
from brokerjobs.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Exit(IntEnum):
    OK = 0
    FAILURE = 1  # the broker, a publish, an export/import, or a kept queue failed
    USAGE = 2  # bad arguments or settings, an invalid payload, no --yes and no terminal
    NOT_FOUND = 3  # the queue does not exist
    NOTHING = 4  # nothing matched (replay, purge, export, show)
    INTERRUPTED = 130  # Ctrl-C


class CliError(click.ClickException):
    """An error the user caused: one line on stderr naming the fix, and an exit code."""

    def __init__(self, message: str, code: int = Exit.FAILURE) -> None:
        super().__init__(message)
        self.exit_code = int(code)  # type: ignore[misc]  # a ClassVar in Click: ours per error

    def show(self, file: Any = None) -> None:
        click.echo(f"brokerjobs: {self.format_message()}", err=True)


def app_argument(function: F) -> F:
    """The ``MODULE:APP`` argument most commands take."""
    return click.argument(
        "app",
        metavar="MODULE:APP",
        help="the app: a module and its App attribute, e.g. shop.jobs:app",
    )(function)


class Duration(click.ParamType[timedelta, str]):
    name = "duration"

    def convert(self, value: Any, param: Any, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.match(str(value).strip())
        if not match:
            self.fail(f"{value!r} is not a duration like 30s, 10m, 2h or 7d", param, ctx)
        try:
            return timedelta(seconds=float(match[1]) * _UNITS[match[2]])
        except OverflowError:
            self.fail(f"{value!r} is longer than timedelta's 999999999 days", param, ctx)


class Regex(click.ParamType[re.Pattern[str], str]):
    name = "regex"

    def convert(self, value: Any, param: Any, ctx: click.Context | None) -> re.Pattern[str]:
        if isinstance(value, re.Pattern):
            return value
        try:
            return re.compile(value)
        except re.error as exc:
            self.fail(f"bad regex {value!r}: {exc}", param, ctx)


def duration(text: str) -> timedelta:
    """``30s``, ``10m``, ``2h``, ``7d`` as a timedelta (CliError otherwise)."""
    try:
        return Duration().convert(text, None, None)
    except click.BadParameter as exc:
        raise CliError(exc.message, Exit.USAGE) from None


def start(**overrides: object) -> Settings:
    """The settings (bad ones are exit 2, the setting named), logging set up, MODULE:APP
    resolvable from the current directory (as uvicorn does)."""
    from brokerjobs.logs import configure_logging

    options: dict[str, Any] = click.get_current_context().find_root().obj or {}
    given = {k: v for k, v in {**options, **overrides}.items() if v is not None and k != "debug"}
    try:
        settings = load_settings(**given)
    except BrokerJobsError as exc:
        raise CliError(str(exc), Exit.USAGE) from None
    configure_logging(settings.log_format, settings.log_level)
    options["debug"] = bool(options.get("debug")) or settings.log_level == "DEBUG"
    if "." not in sys.path and "" not in sys.path:
        sys.path.insert(0, "")
    return settings


def run(work: Coroutine[Any, Any, int | None]) -> int:
    """Run a command's coroutine: a ``BrokerJobsError`` is one line and exit 1 (its traceback
    too with ``--debug`` or BROKERJOBS_LOG_LEVEL=DEBUG), Ctrl-C is exit 130."""
    try:
        return int(asyncio.run(work) or Exit.OK)
    except BrokerJobsError as exc:
        if debugging():
            import traceback

            traceback.print_exc()
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        return Exit.INTERRUPTED


def debugging() -> bool:
    context = click.get_current_context(silent=True)
    options = (context.find_root().obj if context else None) or {}
    return bool(options.get("debug"))


def load_app(path: str) -> App:
    """Import ``module:attribute`` and check that it is an App; errors say how to fix it."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or module_name.startswith("."):
        raise BrokerJobsError(
            f"expected MODULE:APP with an absolute module name (e.g. myservice.jobs:app, "
            f"not a path), got {path!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BrokerJobsError(
            f"cannot import {module_name!r}: {exc}. Run brokerjobs from the directory that "
            f"contains it, or add that directory to PYTHONPATH (current directory: {os.getcwd()})"
        ) from None
    app = getattr(module, attribute, None)
    if isinstance(app, App):
        return app
    apps = sorted(name for name, value in vars(module).items() if isinstance(value, App))
    found = f"; its apps: {', '.join(apps)}" if apps else "; it defines no brokerjobs App"
    if not hasattr(module, attribute):
        raise BrokerJobsError(f"module {module_name!r} has no attribute {attribute!r}{found}")
    raise BrokerJobsError(f"{path!r} is a {type(app).__name__}, not a brokerjobs App{found}")


def examples(*lines: str) -> str:
    """An epilog of example command lines, kept as written (Click rewraps other text)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)
