"""Ports and processes of the throwaway cluster (``tests.support.cluster``): free ports below
the ephemeral range, pid files, and the reaping of runs whose owner died without cleaning up.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import tempfile
from collections.abc import Collection
from pathlib import Path

ROOT = Path(tempfile.gettempdir()) / "bjcluster"


class ClusterError(RuntimeError):
    """The cluster could not be started or queried (message includes the node's log tail)."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(exclude: Collection[int] = ()) -> int:
    """A free port below the ephemeral range: the kernel never hands it to an outgoing
    connection or to a ``bind(0)`` elsewhere between our check and the node's listen."""
    low, _ = _ephemeral_range()
    candidates = list(range(max(1025, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates:
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ClusterError("no free port below the ephemeral range")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def reap_stale_runs(root: Path = ROOT, chroot: Path | None = None) -> list[int]:
    """Kill the recorded processes of runs whose owner process is gone; remove their dirs."""
    killed: list[int] = []
    if not root.is_dir():
        return killed
    for run in root.glob("run-*"):
        owner = read_pid(run / "owner.pid")
        if owner is not None and pid_alive(owner) and owner != os.getpid():
            continue  # another live test run
        for pid_file in run.glob("**/*.pid"):
            if pid_file.name == "owner.pid":
                continue
            pid = read_pid(pid_file)
            seen = "/" + str(run.relative_to(chroot)) if chroot else str(run)
            if pid is not None and pid_alive(pid) and seen in cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        shutil.rmtree(run, ignore_errors=True)
    return killed
