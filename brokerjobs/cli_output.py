"""Output for people with Rich: tables, highlighted JSON and a progress bar on a terminal;
the same content as plain text for scripts (a pipe, a file, ``--json``).

Only the commands that print tables or JSON import this (never ``brokerjobs worker``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

Column = tuple[str, str]  # header, "left" or "right"


@cache
def console(stderr: bool = False) -> Console:
    """Markup and highlighting off: job ids, errors and payloads print exactly as they are.
    Off a terminal the width is unbounded, so a table keeps one line per row."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(
        file=stream,
        markup=False,
        highlight=False,
        emoji=False,
        width=None if terminal else 100_000,
        soft_wrap=not terminal,
    )


def table(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], *, wrap: str | None = None
) -> Table:
    """Columns aligned; a header rule on a terminal, no box characters for scripts. Only the
    ``wrap`` column wraps on a narrow terminal (ids and times stay whole)."""
    terminal = console().is_terminal
    view = Table(
        box=box.SIMPLE_HEAD if terminal else None,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if terminal else "",
    )
    for header, justify in columns:
        view.add_column(
            header, justify="right" if justify == "right" else "left", no_wrap=header != wrap
        )
    for row in rows:
        view.add_row(*(Text(cell) for cell in row))
    return view


def show(renderable: Any) -> None:
    """On a terminal as Rich draws it; for scripts without the padding after the last column."""
    out = console()
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    lines = captured.get().splitlines()
    sys.stdout.write("".join(line.rstrip() + "\n" for line in lines))


def print_json(data: Any, *, indent: int | None = 2) -> None:
    """Highlighted and indented on a terminal; plain ``json.dumps`` text for scripts."""
    text = json.dumps(data, indent=indent, default=str)
    if console().is_terminal:
        console().print_json(text, indent=indent, default=str)
    else:
        sys.stdout.write(text + "\n")


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A bar on stderr while the block runs, if stderr is a terminal; else no callback."""
    if not console(stderr=True).is_terminal:
        yield None
        return
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=max(total, 1))

        yield advance
