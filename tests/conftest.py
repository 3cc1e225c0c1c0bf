"""Shared fixtures: one Prefect server for the whole session, loopback HTTP servers, the CLI."""
from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import tarfile
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PROJECT = HERE.parent
SAMPLE = PROJECT / "flows" / "data" / "mnist_sample.tgz"
TINY = HERE / "data" / "mnist_tiny.tgz"
PIXELSIM = str(Path(sys.executable).with_name("pixelsim"))

# the published fastbook figures (and the tiny archive's), per ../shared/data/README.md
SAMPLE_FIGURES = {"l1": {"3": 0.9168, "7": 0.9854, "balanced": 0.9511},
                  "rmse": {"3": 0.9584, "7": 0.9737, "balanced": 0.9661}}
SAMPLE_COUNTS = {"train": {"3": 6131, "7": 6265}, "valid": {"3": 1010, "7": 1028}}
TINY_FIGURES = {"l1": {"3": 0.8829, "7": 0.9800, "balanced": 0.9314},
                "rmse": {"3": 0.9429, "7": 0.9629, "balanced": 0.9529}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PIXELSIM_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_COLORS="false",
               # a run without PREFECT_API_URL uses a temporary server, leaving no background one behind
               # (tests/test_server.py runs the default, pixelsim's own server, and stops it)
               PIXELSIM_SERVER="temporary",
               # never reach the real internet from a test: the official URL is a closed loopback port
               PIXELSIM_URL_MNIST_SAMPLE=f"http://127.0.0.1:{free_port()}/mnist_sample.tgz")
    return env


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
        return r.status == 200


@contextlib.contextmanager
def running_prefect_server(home: Path, env: dict[str, str], ready=_healthy, timeout: float = 90) -> Iterator[str]:
    """`prefect server start` on a free 127.0.0.1 port until `ready(api_url)`; yields the API URL, stops it after."""
    port = free_port()
    env = {**env, "PREFECT_SERVER_API_PORT": str(port)}   # the UI's API URL follows this, not --port
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if ready(url):
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        stop(proc, 20)


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """Terminate, and kill if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[str]:
    """One `prefect server start` on 127.0.0.1 for every CLI test (a temporary one costs ~10 s a run)."""
    home = tmp_path_factory.mktemp("prefect-home")
    with running_prefect_server(home, base_env(home)) as url:
        yield url


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)

    @property
    def report(self) -> dict:
        """The report JSON of `run --json` (or `show --json`)."""
        return self.json["report"]

    def states(self) -> list[str]:
        """Final task states from the run's log lines, e.g. ['Cached', 'Completed', ...]."""
        return [line.split("Finished in state ")[1].split("(")[0] for line in self.stderr.splitlines()
                if "Task run" in line and "Finished in state" in line]


class Cli:
    """Runs `pixelsim` in a subprocess, as a user would."""

    def __init__(self, env: dict[str, str], root: Path):
        self.env = env
        self.root = root

    def __call__(self, *args: str, timeout: float = 300, env: dict | None = None) -> Result:
        cmd = [PIXELSIM, *args]
        if args and args[0] == "run" and "--root" not in args:
            cmd += ["--root", str(self.root)]
        p = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                           cwd=self.root.parent)
        return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def cli(prefect_server, tmp_path) -> Cli:
    """The CLI against the session's server, with its own storage root and result store."""
    env = base_env(tmp_path / "home")
    env.update(PREFECT_API_URL=prefect_server, PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"))
    return Cli(env, tmp_path / "root")


@pytest.fixture
def serve(tmp_path):
    """Serve files from a folder on 127.0.0.1; returns a function giving the URL of a file."""
    servers = []

    def start(files: dict[str, Path | bytes]) -> str:
        folder = Path(tempfile.mkdtemp(dir=tmp_path, prefix="www-"))
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copy(content, folder / name)
            else:
                (folder / name).write_bytes(content)
        handler = functools.partial(Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def plain_pipeline(root: str, source: Path = TINY, dataset: str = "tiny", shard_size: int = 300, **options):
    """The whole pipeline without Prefect (the API's plain runner); returns the RunResult."""
    import pixelsim

    return pixelsim.run(dataset=dataset, source=str(source), root=root, shard_size=shard_size, **options)


def assert_figures(report: dict, figures: dict) -> None:
    for metric, want in figures.items():
        got = report["metrics"][metric]
        assert got["per_class"] == {k: v for k, v in want.items() if k != "balanced"}, metric
        assert got["balanced"] == want["balanced"], metric


@pytest.fixture
def folder(tmp_path) -> Path:
    """mnist_tiny unpacked: a folder source that the tests grow and edit."""
    with tarfile.open(TINY) as tf:
        tf.extractall(tmp_path / "src", filter="data")
    return tmp_path / "src" / "mnist_tiny"


def grow(folder: Path, n: int) -> list[str]:
    """Copy n images of each split's first class under new names; returns their paths in the archive."""
    added = []
    for split in ("train", "valid"):
        for f in sorted((folder / split / "3").glob("*.png"))[:n]:
            new = f.with_name(f.stem + "_new.png")
            shutil.copy(f, new)
            added.append(str(new.relative_to(folder.parent)))
    return sorted(added)
