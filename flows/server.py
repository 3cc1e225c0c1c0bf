"""pixelsim's local Prefect server: started once in the background, reused by every later run.

Without `PREFECT_API_URL`, the first `pixelsim run` (or `serve`) starts `prefect server start`
on 127.0.0.1 in the background, says so on stderr with the UI's address, and leaves it running;
every later run finds it (its address is kept in `$PREFECT_HOME/pixelsim-server.json`, checked
against `/api/health`) instead of booting a temporary server (5-10 s a run). The server boots
while the run imports Prefect, torch and the steps. `pixelsim server start|stop|status` manages
it by hand; `PIXELSIM_SERVER=temporary` keeps Prefect's temporary server per run instead, which
`temporary()` starts and ties to the run's life (`flows.tether`), so a killed run leaves none.
Finding the server costs one local HTTP request: this module imports no Prefect, except to
install the crash watch on a server it started (`watch_crashes`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pixelsim.storage.cache import prefect_home
from pixelsim.storage.errors import OptionError, PixelsimError
from pixelsim.storage.locks import alive, identity

DEFAULT_PORT = 4200
MODES = ("auto", "temporary")   # PIXELSIM_SERVER
START_TIMEOUT_S = 180.0         # a first start migrates a new database: slow on a busy 2-core machine
CRASH_WATCH = "pixelsim: mark unresponsive runs Crashed"


def state_file() -> Path:
    return prefect_home() / "pixelsim-server.json"


def mode() -> str:
    value = os.environ.get("PIXELSIM_SERVER", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise OptionError(f"PIXELSIM_SERVER={value!r}: use auto (pixelsim's background server, started on "
                          "first use) or temporary (Prefect's temporary server for each run)")
    return value


def _healthy(api: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _state() -> dict | None:
    """The recorded server, if its process is alive (it may still be booting)."""
    try:
        state = json.loads(state_file().read_text())
        if isinstance(state, dict) and state.get("api") and alive(int(state.get("pid", 0) or 0), state.get("identity")):
            return state
    except (OSError, ValueError, TypeError):
        pass
    return None


def running() -> dict | None:
    """The server pixelsim started, if it answers: {"pid", "api", "ui", "log"}."""
    state = _state()
    return state if state and _healthy(state["api"]) else None


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


@contextlib.contextmanager
def _start_lock() -> Iterator[None]:
    """Two runs starting at once start one server: the second finds the first's state file."""
    prefect_home().mkdir(parents=True, exist_ok=True)
    with open(prefect_home() / "pixelsim-server.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def launch(port: int | None = None) -> tuple[dict, bool]:
    """The recorded server (alive, maybe still booting), else one started now and not waited
    for; returns (its state, started now)."""
    with _start_lock():
        if state := _state():
            return state, False
        port = port or (DEFAULT_PORT if _free(DEFAULT_PORT) else _any_port())
        api, log = f"http://127.0.0.1:{port}/api", prefect_home() / "pixelsim-server.log"
        env = {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
               "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")}
        env.pop("PREFECT_API_URL", None)
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                     "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        state = {"pid": proc.pid, "identity": identity(proc.pid), "api": api, "ui": api.removesuffix("/api"),
                 "log": str(log)}
        tmp = state_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_file())
        return state, True


def wait_ready(state: dict, timeout: float = START_TIMEOUT_S) -> dict:
    """Wait for a launched server to answer; a server that dies or never answers is stopped and
    named in one error with the end of its log."""
    deadline = time.monotonic() + timeout
    while not _healthy(state["api"]):
        if not alive(int(state["pid"])) or time.monotonic() > deadline:
            _kill(int(state["pid"]))
            with contextlib.suppress(OSError):
                if json.loads(state_file().read_text()).get("pid") == state["pid"]:
                    state_file().unlink()
            try:
                tail = Path(state["log"]).read_text(errors="replace")[-300:].strip().replace("\n", " | ")
            except OSError:
                tail = ""
            raise PixelsimError(f"the Prefect server at {state['ui']} did not start within {timeout:.0f} s "
                                f"(log {state['log']}: {tail}); or run with PIXELSIM_SERVER=temporary")
        time.sleep(0.1)
    return state


def start(port: int | None = None, timeout: float = START_TIMEOUT_S) -> tuple[dict, bool]:
    """Start the server unless it runs, and wait until it answers; returns (state, started now)."""
    state, started = launch(port)
    return wait_ready(state, timeout), started


def _kill(pid: int, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def stop() -> bool:
    """Stop the server pixelsim started; False when none was running."""
    with _start_lock():
        state = _state()
        if state:
            _kill(int(state["pid"]))
        state_file().unlink(missing_ok=True)
    return state is not None


def use(announce=lambda line: print(line, file=sys.stderr)) -> dict | None:
    """Point this process at pixelsim's server when no PREFECT_API_URL is set, starting it in
    the background if need be (announced); returns its state, None for a temporary server.
    Call `wait_ready` on it before the first API call."""
    if api := os.environ.get("PREFECT_API_URL"):
        if not _healthy(api.rstrip("/"), timeout=5.0):
            raise PixelsimError(f"PREFECT_API_URL {api}: no Prefect API answers there ({api.rstrip('/')}/health); "
                                "start that server, or unset PREFECT_API_URL to use pixelsim's own")
        return None
    if mode() == "temporary":
        return None
    state, started = launch()
    os.environ["PREFECT_API_URL"] = state["api"]
    if started:
        announce(f"pixelsim: started a Prefect server in the background for this and later runs: UI at "
                 f"{state['ui']} (log {state['log']}); `pixelsim server stop` stops it, "
                 "PIXELSIM_SERVER=temporary runs without it")
    else:
        announce(f"pixelsim: Prefect UI at {state['ui']} (pixelsim's background server)")
    state["started"] = started
    return state


def temporary(poll_s: float = 0.05) -> None:
    """Start Prefect's temporary API server now, if this run will use one (no API URL in the
    environment or profile), and tether it to this process: it is stopped once the run is gone,
    however it ended. Prefect's clients then find it started (one instance per process)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    from pixelsim.flows.tether import tether

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    srv, failed, tethered = SubprocessASGIServer(), [], set()

    def boot() -> None:
        try:
            srv.start()
        except BaseException as e:  # noqa: BLE001 - raised again on this thread
            failed.append(e)

    def tie() -> None:   # each process Prefect spawns (it spawns again on a port conflict)
        proc = srv.server_process
        if proc is not None and proc.pid not in tethered:
            tethered.add(proc.pid)
            tether(proc.pid)

    # started on a thread so that the server is tethered while it boots (5-10 s), not after
    booting = threading.Thread(target=boot, name="pixelsim-temporary-server", daemon=True)
    booting.start()
    while booting.is_alive():
        tie()
        booting.join(poll_s)
    tie()
    if failed:
        raise failed[0]


def watch_crashes(api: str) -> None:
    """Install, once per server, the automation that marks a flow run Crashed when its process
    died without saying so (killed, machine lost): it stops sending heartbeats, and this fires
    when none came for three intervals. (A run that fails or is interrupted says so itself.)"""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    heartbeat_s = get_current_settings().flows.heartbeat_frequency or 180
    with temporary_settings({PREFECT_API_URL: api}):
        with contextlib.suppress(ValueError):
            Automation.read(name=CRASH_WATCH)
            return
        Automation(
            name=CRASH_WATCH, description="pixelsim: a flow run that stopped sending heartbeats is marked Crashed",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=timedelta(seconds=3 * heartbeat_s)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {3 * heartbeat_s} s: "
                                        "the run's process died")],
        ).create()
