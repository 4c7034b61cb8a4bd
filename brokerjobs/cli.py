"""The ``brokerjobs`` command (Click): run, inspect and repair brokerjobs apps.

Each command's module is imported only when that command runs (or ``--help`` lists it), so
``brokerjobs worker`` loads Click and the worker, never Rich, the parking tools or the publisher.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from brokerjobs import __version__
from brokerjobs.cli_support import Exit, load_app

__all__ = ["load_app", "main", "root"]

# command name -> (module, attribute): imported on first use
_COMMANDS = {
    "worker": ("brokerjobs.worker_cli", "worker"),
    "scheduler": ("brokerjobs.worker_cli", "scheduler"),
    "topology": ("brokerjobs.topology_cli", "topology"),
    "stats": ("brokerjobs.stats_cli", "stats"),
    "health": ("brokerjobs.stats_cli", "health"),
    "parked": ("brokerjobs.parking_cli", "parked"),
    "publish": ("brokerjobs.publish_cli", "publish_command"),
}


class LazyGroup(click.Group):
    """The root group: subcommands are named here and imported when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        import importlib

        module, attribute = _COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="\b\nExamples:\n  brokerjobs worker shop.jobs:app\n"
    "  brokerjobs parked list shop.emails\n\n"
    "Settings come from BROKERJOBS_* environment variables (see the README); exit codes and "
    "shell completion are described in docs/cli.md.",
)
@click.version_option(__version__, "-V", "--version", prog_name="brokerjobs")
@click.option("--url", metavar="URL", help="AMQP URL of the broker [default: $BROKERJOBS_URL]")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="log lines as text or JSON [default: $BROKERJOBS_LOG_FORMAT, else text]",
)
@click.option(
    "--debug",
    is_flag=True,
    help="show tracebacks with errors (as BROKERJOBS_LOG_LEVEL=DEBUG does)",
)
@click.pass_context
def root(ctx: click.Context, url: str | None, log_format: str | None, debug: bool) -> None:
    """Run, inspect and repair brokerjobs apps: workers, the scheduler, the topology, queue
    stats, parked jobs, and publishing from a shell."""
    ctx.obj = {"url": url, "log_format": log_format, "debug": debug}


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: the exit code of the command (see docs/cli.md, "Exit codes")."""
    try:
        code: Any = root.main(
            args=list(argv) if argv is not None else None,
            prog_name="brokerjobs",
            standalone_mode=False,
        )
    except click.ClickException as exc:  # CliError and Click's usage errors (exit 2)
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("brokerjobs: interrupted", err=True)
        return Exit.INTERRUPTED
    return int(code) if isinstance(code, int) else Exit.OK


if __name__ == "__main__":
    sys.exit(main())
