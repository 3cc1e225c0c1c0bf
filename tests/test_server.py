"""`pixelsim server`: one background Prefect server that later runs use instead of a temporary one."""
from __future__ import annotations

import json
import subprocess

from conftest import PIXELSIM, TINY, TINY_FIGURES, assert_figures, base_env, free_port


def test_server_start_is_used_by_later_runs_and_stops(tmp_path):
    env = base_env(tmp_path / "home")
    del env["PIXELSIM_SERVER"]            # the default: pixelsim's own server

    def pixelsim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([PIXELSIM, *args], env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=tmp_path)

    assert pixelsim("server", "status").returncode == 1
    port = free_port()
    try:
        started = pixelsim("server", "start", "--port", str(port))
        assert started.returncode == 0, started.stderr
        assert f"UI at http://127.0.0.1:{port}" in started.stdout and "pixelsim server stop" in started.stdout
        again = pixelsim("server", "start")
        assert "already running" in again.stdout
        status = pixelsim("server", "status")
        assert status.returncode == 0 and f"127.0.0.1:{port}" in status.stdout

        run = pixelsim("run", "--source", str(TINY), "--root", str(tmp_path / "root"), "--json")
        assert run.returncode == 0, run.stderr
        assert_figures(json.loads(run.stdout)["report"], TINY_FIGURES)
        assert f"pixelsim: Prefect UI at http://127.0.0.1:{port} (pixelsim's background server)" in run.stderr
        assert "Starting temporary server" not in run.stderr
        # the run is on that server, for the UI to show
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}), get_client(sync_client=True) as c:
            assert [r.state_name for r in c.read_flow_runs()] == ["Completed"]
    finally:
        stopped = pixelsim("server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert pixelsim("server", "status").returncode == 1
    assert "no Prefect server started by pixelsim is running" in pixelsim("server", "stop").stdout


def test_the_first_run_starts_a_background_server_that_later_runs_reuse(tmp_path):
    """The README's `pixelsim run`, as a newcomer types it: no PREFECT_API_URL, no server."""
    env = base_env(tmp_path / "home")
    del env["PIXELSIM_SERVER"]            # the default: pixelsim's own server

    def pixelsim(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PIXELSIM, *args], env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)

    run = ["run", "--source", str(TINY), "--root", str(tmp_path / "root"), "--json"]
    try:
        first = pixelsim(*run)
        assert first.returncode == 0, first.stderr
        assert "pixelsim: started a Prefect server in the background for this and later runs: UI at " \
               "http://127.0.0.1:" in first.stderr and "`pixelsim server stop` stops it" in first.stderr
        state = json.loads((tmp_path / "home" / "pixelsim-server.json").read_text())
        second = pixelsim(*run)
        assert second.returncode == 0, second.stderr
        assert f"pixelsim: Prefect UI at {state['ui']} (pixelsim's background server)" in second.stderr
        assert "started a Prefect server" not in second.stderr and "temporary server" not in second.stderr
        runs = [json.loads(p.stdout) for p in (first, second)]
        assert_figures(runs[1]["report"], TINY_FIGURES) and all(runs[1]["cached"].values())
        assert pixelsim("server", "status").returncode == 0

        from prefect.automations import Automation
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: state["api"]}), get_client(sync_client=True) as c:
            assert sorted(str(r.id) for r in c.read_flow_runs() if r.state_name == "Completed") == \
                sorted(r["run_id"] for r in runs)
            # crashed-run detection: each run sent heartbeats, and the server watches for their end
            for r in runs:
                got = c._client.post("/events/filter", json={"filter": {
                    "event": {"name": ["prefect.flow-run.heartbeat"]},
                    "resource": {"id": [f"prefect.flow-run.{r['run_id']}"]}}}).json()
                assert got["total"] >= 1, r["run_id"]
            watch = Automation.read(name="pixelsim: mark unresponsive runs Crashed")
            assert watch.trigger.within.total_seconds() == 3 * 180 and watch.trigger.posture == "Proactive"
            assert watch.actions[0].state.value == "CRASHED"
    finally:
        stopped = pixelsim("server", "stop")
    assert "stopped" in stopped.stdout and pixelsim("server", "status").returncode == 1
