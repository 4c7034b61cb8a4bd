"""Who this process is, as operators see it in headers and connection names: ``host:pid``."""

from __future__ import annotations

import os
import socket


def process_identity() -> str:
    """``host:pid`` of this process (read each time: a forked worker has its own pid)."""
    return f"{socket.gethostname()}:{os.getpid()}"
