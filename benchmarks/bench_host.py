"""What the parent finds on this host: the broker's OS process (to read its CPU time) and a
temporary git worktree of another commit (the ``--baseline`` contestant), byte-compiled as an
installed package is. Standard library only.
"""

from __future__ import annotations

import compileall
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository checkout this file is in
BROKER_PROCESS = "beam.smp"
LISTEN = "0A"  # TCP state in /proc/net/tcp


def _pids_named(name: str) -> list[int]:
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == name:
                pids.append(int(comm.parent.name))
    return pids


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == LISTEN and int(fields[1].rpartition(":")[2], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    targets = {f"socket:[{inode}]" for inode in inodes}
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if fd.readlink().name in targets:
                    return True
    return False


def broker_pid(port: int) -> int | None:
    """The RabbitMQ node (beam.smp) listening on ``port``: only read, never signalled.

    With one node on the host it is that one; with several, the one holding the listening
    socket (needs the right to read its fds). None when it cannot be told.
    """
    pids = _pids_named(BROKER_PROCESS)
    if len(pids) == 1:
        return pids[0]
    inodes = _listening_inodes(port)
    owners = [pid for pid in pids if inodes and _holds_socket(pid, inodes)]
    return owners[0] if len(owners) == 1 else None


@dataclass(frozen=True, slots=True)
class Checkout:
    rev: str  # as given, e.g. HEAD~1
    commit: str  # short hash
    subject: str  # the commit's first line
    path: Path


class GitError(RuntimeError):
    """A git command for the baseline checkout failed."""


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise GitError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Checkout]:
    """A detached git worktree of ``rev`` in a temporary directory, removed afterwards."""
    commit = _git("rev-parse", "--verify", "--short", f"{rev}^{{commit}}")
    subject = _git("log", "-1", "--format=%s", commit)
    path = Path(tempfile.mkdtemp(prefix="bjbench-baseline-")) / "tree"
    _git("worktree", "add", "--detach", str(path), commit)
    try:
        yield Checkout(rev, commit, subject, path)
    finally:
        with contextlib.suppress(GitError):
            _git("worktree", "remove", "--force", str(path))
        shutil.rmtree(path.parent, ignore_errors=True)


def byte_compile(tree: Path, folders: tuple[str, ...] = ("brokerjobs", "benchmarks")) -> None:
    """Write the bytecode of ``tree``'s ``folders`` (``__pycache__``), as installing does.

    Children may run with PYTHONDONTWRITEBYTECODE (so may a developer's shell): brokerjobs would
    then be compiled from source in every child (0.9 MiB more RSS after the imports, 0.3-0.4 MiB
    more at the peak than an installed brokerjobs), while aio-pika and pydantic come
    byte-compiled from site-packages.
    """
    for folder in folders:
        compileall.compile_dir(tree / folder, quiet=1)  # a file that fails: its child says why
