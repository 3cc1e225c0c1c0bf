"""`pixelsim server`: one background Prefect server that later runs use instead of a temporary one."""
from __future__ import annotations

import json
import subprocess

from conftest import PIXELSIM, TINY, TINY_FIGURES, assert_figures, base_env, free_port


def test_server_start_is_used_by_later_runs_and_stops(tmp_path):
    env = base_env(tmp_path / "home")

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
        assert_figures(json.loads(run.stdout), TINY_FIGURES)
        assert f"using the Prefect server started by `pixelsim server start`: UI at http://127.0.0.1:{port}" \
            in run.stderr
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
