"""`pixelsim server start|stop|status`: one local Prefect server in the background.

Without `PREFECT_API_URL`, every `pixelsim run` boots a temporary Prefect server (5-10 s here)
and stops it again. A server started once with `pixelsim server start` keeps running; every
later `pixelsim run` or `serve` without `PREFECT_API_URL` finds it (its address is kept in
`$PREFECT_HOME/pixelsim-server.json`, checked against `/api/health`) and says so on stderr.
Nothing starts a server unasked. This module imports no Prefect: finding the server costs one
local HTTP request.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pixelsim.storage.cache import prefect_home
from pixelsim.storage.locks import alive

DEFAULT_PORT = 4200


def state_file() -> Path:
    return prefect_home() / "pixelsim-server.json"


def _healthy(api: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def running() -> dict | None:
    """The server pixelsim started, if it still answers: {"pid", "api", "ui", "log"}."""
    try:
        state = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not alive(int(state.get("pid", 0) or 0)) or not _healthy(state.get("api", "")):
        return None
    return state


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _any_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int | None = None, timeout: float = 180.0) -> tuple[dict, bool]:
    """Start the server (bound to 127.0.0.1 only) unless it runs; returns (its state, started now)."""
    if state := running():
        return state, False
    port = port or (DEFAULT_PORT if _free(DEFAULT_PORT) else _any_port())
    api, log = f"http://127.0.0.1:{port}/api", prefect_home() / "pixelsim-server.log"
    prefect_home().mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")}
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not _healthy(api):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            tail = log.read_text(errors="replace")[-400:].strip().replace("\n", " | ")
            raise RuntimeError(f"the Prefect server did not start on port {port} (see {log}): {tail}")
        time.sleep(0.25)
    state = {"pid": proc.pid, "api": api, "ui": api.removesuffix("/api"), "log": str(log)}
    tmp = state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_file())
    return state, True


def stop(timeout: float = 30.0) -> bool:
    """Stop the server pixelsim started; False when none was running."""
    try:
        state = json.loads(state_file().read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    stopped = False
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        stopped = True
    state_file().unlink(missing_ok=True)
    return stopped


def use_running_server() -> str | None:
    """Point this process at pixelsim's background server when no PREFECT_API_URL is set."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    state = running()
    if state:
        os.environ["PREFECT_API_URL"] = state["api"]
        return state["ui"]
    return None
