"""A crash switch for recovery tests: SIGKILL this process at a named point.

`PIXELSIM_CRASH_AT=publish:shards` kills the run right before it publishes its first
shard, leaving whatever a real crash would leave; a rerun must then come out identical
to a clean run. Unset (always, outside tests) it costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal


def checkpoint(name: str) -> None:
    if os.environ.get("PIXELSIM_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def publishing(rel: str) -> None:
    """The point just before an artifact under `rel`'s top folder is published."""
    checkpoint(f"publish:{rel.split('/', 1)[0]}")
