"""A watchdog that ends a process once the process that started the watchdog is gone.

`pixelsim run` without a Prefect server uses Prefect's temporary API server, a child process
that Prefect stops at exit. A run killed outright (SIGKILL, the OOM killer, a CI timeout) runs
no exit handler, and the server, reparented to init, kept running for ever (~230 MB each).
`tether(pid)` starts this module beside it: it polls its own parent (the run) every POLL_S,
and once the run is gone it stops the server (SIGTERM, then SIGKILL after GRACE_S) and exits.
It also exits, doing nothing, once the server has stopped by itself (the run ended normally).

A polling watchdog rather than Linux's PR_SET_PDEATHSIG: Prefect spawns the server with no
hook for it, that signal follows the thread that spawned a child rather than its process, and
polling works wherever `os.getppid` does. It imports nothing beyond the standard library and
`storage.locks`, so it starts in a few tens of milliseconds and holds a few MB.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 10.0


def tether(pid: int) -> subprocess.Popen:
    """Start the watchdog that stops process `pid` once this process is gone."""
    from pixelsim.storage.locks import identity

    return subprocess.Popen([sys.executable, "-m", "pixelsim.flows.tether", str(os.getpid()), str(pid),
                             identity(pid) or ""], stdin=subprocess.DEVNULL)


def _alive(pid: int, ident: str) -> bool:
    from pixelsim.storage.locks import alive

    return alive(pid, ident or None)


def watch(parent: int, pid: int, ident: str) -> None:
    """Wait for `parent` to go (this process is then reparented), then stop `pid`."""
    for sig in (signal.SIGINT, getattr(signal, "SIGHUP", None)):   # Ctrl-C, a closed terminal: the run's
        if sig is not None:                                         # own to handle; we outlive it to clean up
            signal.signal(sig, signal.SIG_IGN)
    while os.getppid() == parent:
        if not _alive(pid, ident):
            return
        time.sleep(POLL_S)
    if not _alive(pid, ident):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while _alive(pid, ident) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid, ident):
        os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))


if __name__ == "__main__":
    try:
        watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    except ProcessLookupError:
        pass
