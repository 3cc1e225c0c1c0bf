"""Scheduling: `pixelsim serve --cron` registers a deployment on a real server and runs what it is
given; `prefect.yaml` deploys the same flow to a work pool."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import PIXELSIM, PROJECT, TINY, TINY_FIGURES, assert_figures, base_env, stop

CRON = "0 2 * * *"


@contextlib.contextmanager
def client(api_url: str) -> Iterator:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as c:
        yield c


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := check()) is not None:
            return got
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}" + (f"; log:\n{log.read_text()[-3000:]}" if log else ""))


def deployment(c, name: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return c.read_deployment_by_name(f"pixel-similarity/{name}")
    except ObjectNotFound:
        return None


def test_serve_registers_cron_deployment_and_runs_it(prefect_server, tmp_path):
    env = base_env(tmp_path / "home")
    env.update(PREFECT_API_URL=prefect_server, PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"))
    name = f"test-{uuid.uuid4().hex[:8]}"
    root = tmp_path / "root"   # given relative: the deployment must hold it absolute
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PIXELSIM, "serve", "--cron", CRON, "--name", name, "--source", str(TINY),
                                 "--root", "root"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        with client(prefect_server) as c:
            dep = wait_for("the deployment", lambda: deployment(c, name), 120, proc, log)
            assert [s.schedule.cron for s in dep.schedules] == [CRON]
            assert all(s.active for s in dep.schedules)
            want = {"dataset": "mnist_tiny", "source": str(TINY), "root": str(root), "metric": "l1",
                    "refresh": False, "shard_size": 5000, "channels": 1, "device": "cpu"}
            assert {k: dep.parameters.get(k) for k in want} == want
            assert None not in dep.parameters.values()   # unset options are left to the flow's defaults
            # the UI's form for a run: typed, with the option's help and its limits, enforced by the server
            props = dep.parameter_openapi_schema["properties"]
            assert props["metric"]["enum"] == ["l1", "rmse"] and props["shard_size"]["minimum"] == 1
            assert props["shard_size"]["description"] == "images per Parquet shard" and dep.enforce_parameter_schema
            with pytest.raises(Exception, match="shard_size|greater than or equal"):
                c.create_flow_run_from_deployment(dep.id, parameters={"shard_size": 0})
            run = c.create_flow_run_from_deployment(dep.id)

            def finished():
                state = c.read_flow_run(run.id).state
                return state if state is not None and state.is_final() else None

            state = wait_for("the flow run", finished, 180, proc, log)
            assert state.is_completed(), f"{state}\n{log.read_text()[-3000:]}"
        reports = list(root.glob("reports/mnist_tiny/*/report.json"))
        assert len(reports) == 1 and (reports[0].parent / "_manifest.json").exists()
        assert_figures(json.loads(reports[0].read_text()), TINY_FIGURES)
    finally:
        stop(proc, 30)


def test_serve_refuses_a_temporary_server(tmp_path):
    p = subprocess.run([PIXELSIM, "serve", "--cron", CRON], env=base_env(tmp_path / "home"),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2
    assert "prefect server start" in p.stderr and "PREFECT_API_URL" in p.stderr


def test_serve_rejects_a_bad_cron(tmp_path):
    p = subprocess.run([PIXELSIM, "serve", "--cron", "every night"], env=base_env(tmp_path / "home"),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "not a cron expression" in p.stderr


def test_prefect_yaml_deploys_the_same_flow_to_a_work_pool(prefect_server, tmp_path):
    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    assert dep["entrypoint"] == "pixelsim.flows.pixel_similarity:pixel_similarity"
    assert [s["cron"] for s in dep["schedules"]] == [CRON]
    # deploy a copy: `prefect deploy` must not write into the checkout
    shutil.copy(PROJECT / "prefect.yaml", tmp_path / "prefect.yaml")
    shutil.copytree(PROJECT / "flows", tmp_path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with client(prefect_server) as c:
        with contextlib.suppress(ObjectAlreadyExists):
            c.create_work_pool(WorkPoolCreate(name=dep["work_pool"]["name"], type="process"))
    env = base_env(tmp_path / "home")
    env.update(PREFECT_API_URL=prefect_server)
    p = subprocess.run([str(Path(PIXELSIM).with_name("prefect")), "--no-prompt", "deploy", "--all"], env=env,
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    with client(prefect_server) as c:
        got = c.read_deployment_by_name(f"pixel-similarity/{dep['name']}")
    assert got.entrypoint == dep["entrypoint"] and got.work_pool_name == dep["work_pool"]["name"]
    assert [(s.schedule.cron, s.schedule.timezone) for s in got.schedules] == [(CRON, "UTC")]
    assert got.parameters == dep["parameters"]
    # runs start in the folder deployed from, where the entrypoint and the relative root resolve
    assert got.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}]
    # `pixelsim serve` has another default name, and refuses to replace this deployment
    assert dep["name"] != "mnist_sample"
    p = subprocess.run([PIXELSIM, "serve", "--cron", CRON, "--name", dep["name"]], env=env, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert f"deployment pixel-similarity/{dep['name']} exists on work pool {dep['work_pool']['name']}" in p.stderr
    with client(prefect_server) as c:
        assert c.read_deployment_by_name(f"pixel-similarity/{dep['name']}").id == got.id   # untouched
