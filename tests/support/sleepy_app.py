"""A ``MODULE:APP`` whose import takes a minute: a child process that is slow to start."""

from __future__ import annotations

import time

from brokerjobs import App

time.sleep(60)
app = App("bjtest.sleepy")
