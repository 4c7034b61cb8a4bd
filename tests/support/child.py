"""A test's child process (a worker, a scheduler) with its output in a file."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.broker import TEST_URL

REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without its BROKERJOBS_* settings, pointed at the test broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERJOBS_")}
    env.update(
        {
            "BROKERJOBS_URL": TEST_URL,
            "BROKERJOBS_HEARTBEAT": "5",
            "BROKERJOBS_CONNECT_TIMEOUT": "5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class LoggedProcess:
    """``python -m <args>`` from the repository root, stdout and stderr appended to ``output``."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], output: Path) -> None:
        self.output = output
        self._out = output.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=REPO_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.output.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self._out.close()
