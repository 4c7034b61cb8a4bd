"""Every command, argument and option of ``brokerjobs`` has help text, every command an example
in its epilog; shell completion comes from Click. Runs the real CLI (``main``) in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from brokerjobs.cli import main, root

BROKERJOBS = str(Path(sys.executable).parent / "brokerjobs")
REPO = Path(__file__).resolve().parents[2]


def commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    context = click.Context(group, info_name="brokerjobs")
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None, name
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


def command_at(path: tuple[str, ...]) -> click.Command:
    command: click.Command = root
    for name in path:
        assert isinstance(command, click.Group)
        found = command.get_command(click.Context(command), name)
        assert found is not None
        command = found
    return command


COMMANDS = list(commands(root))


def test_every_command_is_listed() -> None:
    assert {" ".join(path) for path in COMMANDS} == {
        "worker", "scheduler", "stats", "health", "publish",
        "topology", "topology show", "topology declare", "topology diff", "topology prune",
        "parked", "parked list", "parked show", "parked replay", "parked purge",
        "parked export", "parked import",
    }  # fmt: skip


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_describes_every_argument_and_option_and_ends_with_an_example(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*path, "--help"]) == 0
    text = capsys.readouterr().out
    command = command_at(path)
    assert command.help and command.short_help, path
    assert f"brokerjobs {' '.join(path)}" in text.split("Examples:", 1)[1], text
    for param in command.params:
        assert isinstance(param, click.Option | click.Argument)
        assert param.help, f"{' '.join(path)}: {param.name} has no help text"
        shown = param.make_metavar(click.Context(command))
        names = param.opts if isinstance(param, click.Option) else [shown]
        assert any(name in text for name in names), (param.name, text)


def test_the_top_level_help_lists_the_commands_and_says_where_exit_codes_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "thin argument parsing" not in text
    for name in ("worker", "topology", "parked", "publish", "stats", "health", "scheduler"):
        assert f"\n  {name} " in text
    assert "docs/cli.md" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from brokerjobs import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"brokerjobs, version {__version__}"


def completion(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BROKERJOBS],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=30,
        check=False,
    )


def test_shell_completion_prints_a_script_for_bash_and_zsh() -> None:
    bash = completion(_BROKERJOBS_COMPLETE="bash_source")
    assert bash.returncode == 0, bash.stderr
    assert "_brokerjobs_completion()" in bash.stdout
    assert "complete -o nosort -F _brokerjobs_completion brokerjobs" in bash.stdout
    zsh = completion(_BROKERJOBS_COMPLETE="zsh_source")
    assert "#compdef brokerjobs" in zsh.stdout


def test_completion_completes_commands_and_options() -> None:
    words = completion(
        _BROKERJOBS_COMPLETE="bash_complete", COMP_WORDS="brokerjobs parked re", COMP_CWORD="2"
    )
    assert words.stdout.split() == ["plain,replay"]
    options = completion(
        _BROKERJOBS_COMPLETE="bash_complete",
        COMP_WORDS="brokerjobs parked replay shop.emails --dr",
        COMP_CWORD="4",
    )
    assert options.stdout.split() == ["plain,--dry-run"]


def test_the_worker_loads_neither_rich_nor_the_other_commands() -> None:
    probe = (
        "import sys; from brokerjobs.cli import root; import click; "
        "root.get_command(click.Context(root), 'worker'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rich' or m in "
        "('brokerjobs.parking_cli', 'brokerjobs.publish_cli', 'brokerjobs.topology_cli', "
        "'brokerjobs.cli_output', 'brokerjobs.parking', 'aio_pika')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == "[]"
