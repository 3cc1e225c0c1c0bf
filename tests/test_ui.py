"""What a person sees: a run's artifacts in the Prefect UI (through the API, and rendered by
headless Chromium), and progress bars on a terminal but not in logs."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pty
import re
import select
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from conftest import PIXELSIM, TINY, TINY_FIGURES, assert_figures, base_env, running_prefect_server

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1100", "--virtual-time-budget=20000"]


def ui_settings(api_url: str) -> dict:
    with urllib.request.urlopen(f"{api_url.removesuffix('/api')}/ui-settings", timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def ui_server(prefect_server, tmp_path_factory):
    """A server whose UI calls its own API. A `prefect server start --port N` UI still calls port
    4200 unless PREFECT_SERVER_API_PORT says N, so one is started here if the session's doesn't."""
    if ui_settings(prefect_server)["api_url"] == prefect_server:
        yield prefect_server
        return
    home = tmp_path_factory.mktemp("ui-prefect-home")
    env = {**base_env(home), "PREFECT_SERVER_API_HOST": "127.0.0.1"}
    with running_prefect_server(home, env, ready=lambda url: ui_settings(url)["api_url"] == url, timeout=120) as url:
        yield url


@contextlib.contextmanager
def client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as c:
        yield c


def run_on_terminal(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal; returns (exit code, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([PIXELSIM, *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:   # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                seen.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError("the run did not finish: " + b"".join(seen).decode(errors="replace")[-3000:])
        out = proc.stdout.read().decode()
        return proc.wait(timeout=60), out, b"".join(seen).decode(errors="replace")
    finally:
        os.close(master)
        proc.stdout.close()


@pytest.fixture(scope="module")
def terminal_run(ui_server, tmp_path_factory):
    """One run of the tiny archive as a person at a terminal starts it, filed under a dataset name
    of its own so that its artifact keys are its own."""
    tmp = tmp_path_factory.mktemp("terminal-run")
    dataset = f"ui_{uuid.uuid4().hex[:8]}"
    env = {**base_env(tmp / "home"), "PREFECT_API_URL": ui_server, "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "results"),
           "TERM": "xterm-256color", "COLUMNS": "120"}
    args = ["run", "--source", str(TINY), "--dataset", dataset, "--root", str(tmp / "root"), "--json"]
    code, out, terminal = run_on_terminal(args, env, tmp)
    assert code == 0, terminal[-3000:]
    from pixelsim.flows.ui import artifact_key, artifact_prefix
    from pixelsim.tasks.contracts import Request

    request = Request.build(dataset=dataset, source=str(TINY), root=str(tmp / "root"))
    key = artifact_key(artifact_prefix(request), "").rstrip("-")
    with client(ui_server) as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        (report,) = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{key}-report"])))
    return {"report": json.loads(out)["report"], "terminal": terminal, "key": key, "run_id": report.flow_run_id,
            "root": tmp / "root", "request": request, "args": args, "env": env, "cwd": tmp}


def test_progress_bars_on_a_terminal(terminal_run):
    assert_figures(terminal_run["report"], TINY_FIGURES)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal_run["terminal"])   # without colours and cursor moves
    assert re.search(r"download .*━.*324\.2 kB / 324\.2 kB", text), text[-3000:]
    assert re.search(r"convert .*━.*2/2 shards", text), text[-3000:]
    assert "Finished in state Completed()" in text   # log lines still show, above the bars


def test_no_progress_bar_without_a_terminal(cli):
    r = cli("run", "--source", str(TINY), "--json")
    assert r.code == 0, r.stderr
    assert "━" not in r.stderr and not re.search(r"\d+/\d+ shards", r.stderr) and "\r" not in r.stderr
    assert "Finished in state Completed()" in r.stderr


def test_run_artifacts(terminal_run, ui_server):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    key = terminal_run["key"]
    assert re.fullmatch(r"pixelsim-ui-[0-9a-f]{8}-l1-[0-9a-f]{6}", key)   # dataset, metric, storage root
    with client(ui_server) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[terminal_run["run_id"]])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {f"{key}-{what}" for what in ("report", "accuracy", "convert-progress", "report-folder",
                                                         "history")}

    report = by_key[f"{key}-report"]
    assert report.type == "markdown" and "l1 balanced 0.9314 (3: 0.8829, 7: 0.98)" in report.description
    md = report.data
    pngs = re.findall(r'<img src="data:image/png;base64,([^"]+)"[^>]*alt="template of (\d)"', md)
    assert [c for _, c in pngs] == ["3", "7"]
    assert all(Image.open(io.BytesIO(base64.b64decode(b))).size == (28, 28) for b, _ in pngs)
    assert "| step | result |" in md and "| convert | computed |" in md
    # a local root's places are plain paths: a browser refuses file:// links from the UI's page
    places = dict(re.findall(r"^- (\w+): `([^`]+)`$", md, re.M))
    assert set(places) == {"shards", "templates", "predictions", "report"} and "file://" not in md
    assert Path(places["report"], "report.json").exists()

    table = json.loads(by_key[f"{key}-accuracy"].data)
    assert {r["class"]: r["l1 accuracy"] for r in table} == {"3": 0.8829, "7": 0.98}
    (last,) = json.loads(by_key[f"{key}-history"].data)
    assert last["balanced"] == 0.9314 and last["change"] is None and last["class 3"] == 0.8829

    progress = by_key[f"{key}-convert-progress"]
    assert progress.type == "progress" and progress.data == 100 and "2 of 2 shards" in progress.description

    folder = by_key[f"{key}-report-folder"]
    assert f"`{places['report']}/report.html`" in folder.data


def test_run_name_tags_task_names_and_logs_tell_the_story(terminal_run, ui_server):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    request = terminal_run["request"]
    with client(ui_server) as c:
        run = c.read_flow_run(terminal_run["run_id"])
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert run.name == f"{request.dataset}-l1-{request.key()}"
    assert {"pixelsim", f"dataset:{request.dataset}", "metric:l1"} <= set(run.tags)
    assert sorted(t.name for t in tasks) == ["convert-train-00000", "convert-valid-00000", "download",
                                             "evaluate-00000", "report", "templates", "untar"]
    text = "\n".join(log.message for log in logs)
    assert re.search(r"built: archives/\w+: 324,166 bytes \(sha256 3d615568923a\)", text), text
    assert "built: extracted/" in text and "1,401 files unpacked" in text
    assert re.search(r"built: shards/ui_\w+/\w+/train-00000-of-00001.parquet: 700 images \(3: 350, 7: 350\)", text)
    assert "2 class templates from 700 training images" in text and "700 images predicted by l1, rmse" in text
    assert f"{request.dataset}: l1 accuracy 3 0.8829, 7 0.98, balanced 0.9314" in text
    assert f"report: {terminal_run['report']['artifacts']['report']}/report.html" in text


def test_a_fully_cached_run_shows_no_progress_and_the_change_since_the_last_run(terminal_run, ui_server):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    p = subprocess.run([PIXELSIM, *terminal_run["args"]], env=terminal_run["env"], cwd=terminal_run["cwd"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    name = re.search(r"Flow run '([^']+)'", p.stderr).group(1)
    key = terminal_run["key"]
    with client(ui_server) as c:
        (run,) = [r for r in c.read_flow_runs() if r.name == name and r.id != terminal_run["run_id"]]
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert name == terminal_run["request"].dataset + "-l1-" + terminal_run["request"].key()  # the same request
    by_key = {a.key: a for a in arts}
    assert f"{key}-convert-progress" not in by_key     # nothing was converted
    newest, older = json.loads(by_key[f"{key}-history"].data)[:2]
    assert newest["change"] == 0.0 and older["change"] is None and newest["cached steps"] == 6
    changes = by_key[f"{key}-changes"].data     # what `pixelsim diff` says, against the run before
    assert f"## Since run {older['run']}" in changes and "source archive: unchanged (sha256 3d615568923a)" in changes
    assert "parameters: the same" in changes and re.search(r"  3 +0\.8829 +0\.8829 +\+0\.0000", changes), changes
    assert "reused from the storage root: shards/" in "\n".join(log.message for log in logs)


def chromium(url: str, *flags: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url],
                              capture_output=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed")
def test_ui_renders_the_run_artifacts(terminal_run, ui_server, tmp_path):
    assert CHROMIUM, "CI must install chromium (see .ci/run)"
    settings = ui_settings(ui_server)
    ui = ui_server.removesuffix("/api") + (settings.get("v2_base_url") or "").rstrip("/")
    key = terminal_run["key"]
    page = f"{ui}/runs/flow-run/{terminal_run['run_id']}?tab=Artifacts"
    dom = chromium(page, "--dump-dom").stdout.decode()
    for what in ("report", "accuracy", "convert-progress", "report-folder", "history"):
        assert f"{key}-{what}" in dom, f"{what} card missing from {page}"

    shot = tmp_path / "artifacts.png"
    chromium(page, f"--screenshot={shot}")
    img = Image.open(shot).convert("L")
    assert img.size == (1400, 1100)
    lo, hi = img.getextrema()
    assert hi - lo > 100 and len(img.getcolors(1 << 16)) > 20, "blank screenshot"

    with client(ui_server) as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

        (report,) = c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"{key}-report"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[terminal_run["run_id"]])))
    dom = chromium(f"{ui}/artifacts/artifact/{report.id}", "--dump-dom").stdout.decode()
    assert dom.count('src="data:image/png;base64,') == 2, "templates not rendered in the report artifact"
