"""One honest error contract: one line naming what and where, no traceback unless --verbose,
permanent OS errors never retried, a closed pipe and Ctrl-C end quietly."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys

import pytest

from conftest import PIXELSIM, TINY, base_env
from pixelsim.flows.runners import is_transient
from pixelsim.storage.errors import ChecksumError, TransientDownloadError


@pytest.mark.parametrize("error,transient", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"), False),
    (PermissionError(errno.EACCES, "Permission denied", "/x"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (OSError(errno.EROFS, "Read-only file system"), False),
    (OSError(errno.EFBIG, "File too large"), False),
    (ChecksumError("u", "sha256 differs"), False),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (TimeoutError("slow"), True),
    (TransientDownloadError("u", "HTTP 503"), True),
])
def test_only_errors_a_retry_can_mend_are_retried(error, transient):
    assert is_transient(error) is transient


def run(args: list[str], tmp_path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PIXELSIM, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=base_env(tmp_path / "home"), **kw)


@pytest.mark.parametrize("root", ["/proc/pixelsim-root", "a-file"])
def test_an_unusable_root_is_one_line_before_prefect_starts(tmp_path, root):
    (tmp_path / "a-file").write_text("not a folder")
    p = run(["run", "--source", str(TINY), "--root", root], tmp_path)
    assert p.returncode == 1
    assert p.stderr.startswith("pixelsim: error: ") and p.stderr.count("\n") == 1, p.stderr   # Prefect never started
    assert root in p.stderr


def test_a_failed_run_ends_in_one_line_and_shows_the_traceback_only_when_asked(cli, tmp_path):
    bad = tmp_path / "notes.tgz"
    bad.write_text("these are not the images you are looking for\n")
    quiet = cli("run", "--source", str(bad))
    assert quiet.code == 1 and "Traceback" not in quiet.stderr, quiet.stderr
    last = quiet.stderr.strip().splitlines()[-1]
    assert last.startswith("pixelsim: error: ") and "notes.tgz" in last
    loud = cli("--verbose", "run", "--source", str(bad), "--root", str(cli.root))
    assert loud.code == 1 and "Traceback" in loud.stderr and loud.stderr.strip().splitlines()[-1] == last


def test_a_closed_pipe_ends_quietly(tmp_path):
    import pixelsim

    pixelsim.run(source=str(TINY), root=str(tmp_path / "root"), shard_size=300)
    p = subprocess.Popen([PIXELSIM, "show", "--root", str(tmp_path / "root"), "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=base_env(tmp_path / "home"), cwd=tmp_path)
    p.stdout.read(10)
    p.stdout.close()          # as `| head -c 10` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and err == "", err


def test_an_unreachable_prefect_api_url_is_one_line_before_the_run(tmp_path):
    from conftest import free_port
    env = {**base_env(tmp_path / "home"), "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    p = subprocess.run([PIXELSIM, "run", "--source", str(TINY), "--root", str(tmp_path / "root")], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"pixelsim: error: PREFECT_API_URL {env['PREFECT_API_URL']}: no Prefect API answers")
    assert not (tmp_path / "root" / "shards").exists()


def test_a_prefect_api_that_goes_away_mid_run_is_one_line(monkeypatch, capsys):
    import httpx

    from pixelsim.flows import cli

    def lost(args):
        try:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        except httpx.ConnectError as e:
            raise RuntimeError("Failed to reach API at http://127.0.0.1:4200/api/") from e

    monkeypatch.setattr(cli, "command", lost)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert cli._main(["run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pixelsim: error: the Prefect API at http://127.0.0.1:4200/api "
                                                   "stopped answering (RuntimeError: Failed to reach API")
    monkeypatch.setattr(cli, "command", lambda args: 1 / 0)   # anything else is a bug: its traceback is kept
    with pytest.raises(ZeroDivisionError):
        cli._main(["run"])


@pytest.mark.parametrize("limit,step", [(200_000, "archives"), (3_500_000, "extracted")])
def test_a_full_disk_is_one_line_naming_where_and_never_retried(cli, limit, step):
    """A file size limit (RLIMIT_FSIZE: EFBIG, as ENOSPC or EDQUOT would be) hit while the
    download or the unpacking writes into the root."""
    import resource
    import signal

    from conftest import SAMPLE

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run([PIXELSIM, "run", "--source", str(SAMPLE), "--root", str(cli.root)], env=cli.env,
                       capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert p.returncode == 1, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("pixelsim: error: ") and f"{cli.root}/{step}/" in last and "File too large" in last
    assert "Retry" not in p.stderr and "Traceback" not in p.stderr
    assert not (cli.root / step).exists() or not any((cli.root / step).iterdir())   # nothing half-written left


def test_a_full_disk_in_a_later_step_names_the_file_and_a_rerun_completes(cli):
    """The same in each later step, whose writes go through pyarrow or plain file writes that
    name no file: the line names the file or folder being written; nothing half-written stays."""
    import resource
    import signal

    from conftest import SAMPLE

    def run(limit: int | None) -> subprocess.CompletedProcess:
        def small_files() -> None:
            if limit:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return subprocess.run([PIXELSIM, "run", "--source", str(SAMPLE), "--root", str(cli.root)], env=cli.env,
                              capture_output=True, text=True, timeout=300, preexec_fn=small_files)

    assert run(None).returncode == 0
    # each limit is under the smallest file the step writes, above every file of the steps before
    for folder, limit in (("reports", 20_000), ("evaluations", 50_000), ("templates", 5_000), ("shards", 500_000)):
        shutil.rmtree(cli.root / folder)
        p = run(limit)
        assert p.returncode == 1, (folder, p.stderr)
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith(f"pixelsim: error: {cli.root}/{folder}/mnist_sample/") and "File too large" in last
        assert "Retry" not in p.stderr and "Traceback" not in p.stderr
        assert not [f for f in (cli.root / folder).rglob("*") if f.is_file()], folder   # no .tmp- file left
        p = run(None)
        assert p.returncode == 0 and "accuracy on 3: 0.9168" in p.stdout, p.stderr


def test_ctrl_c_mid_run_ends_quietly_and_the_run_is_not_left_running(cli, tmp_path):
    """Ctrl-C while the download waits on a stalled server: one line, exit 130, no traceback,
    and the flow run in the Prefect API is Crashed or Cancelled, not Running for ever."""
    import http.server
    import signal
    import threading
    import time

    asked = threading.Event()

    class Stall(http.server.BaseHTTPRequestHandler):
        def do_GET(self):   # noqa: N802 - the handler's name
            asked.set()
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            time.sleep(60)

        def do_HEAD(self):   # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/stalled.tgz"
    p = subprocess.Popen([PIXELSIM, "run", "--source", url, "--root", str(cli.root)], env=cli.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert asked.wait(120), "the run never asked for the archive"
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        server.shutdown()
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "pixelsim: interrupted"
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: cli.env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        latest = c.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=20)   # the session's server has many
        states = [r.state_type.value for r in latest if r.parameters.get("source") == url]
    assert states and all(s in ("CRASHED", "CANCELLED") for s in states), states
