"""The fault model of docs/RELIABILITY.md, end to end: the `pixelsim` CLI in subprocesses
against misbehaving loopback HTTP servers, crashes, concurrent runs and leaked secrets.

CLI runs are what these tests cost, so each one earns its keep; the fine-grained cases live
next to their code (tests/test_fetch.py, test_archive.py, test_images.py, test_properties.py).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import PIXELSIM, TINY, TINY_FIGURES, Cli, Result, assert_figures, base_env
from pixelsim.storage.root import MANIFEST, Root

TINY_BYTES = TINY.read_bytes()
TINY_SHA = hashlib.sha256(TINY_BYTES).hexdigest()
CRASH_POINTS = ["archives", "extracted", "shards", "templates", "evaluations", "reports"]


# --- a loopback server that misbehaves on cue ---------------------------------------------

class Handler(BaseHTTPRequestHandler):
    server: "Site"

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        site = self.server
        with site.lock:
            site.requests.append((self.command, self.path, dict(self.headers)))
            body = site.files.get(self.path.split("?")[0])
            act = site.script.pop(0) if site.script and not head else None
        if site.auth and self.headers.get("Authorization") != site.auth:
            return self.reply(401, b"", head)
        if site.hold and not head:
            site.hold()
        if act is not None:
            return act(self, body or b"")
        if body is None:
            return self.reply(404, b"not here", head)
        # what a static file server says: the ETag changes with the bytes
        self.reply(200, body, head, {"ETag": f'"{hashlib.sha1(body).hexdigest()}"'})

    def reply(self, status: int, body: bytes, head: bool = False, headers: dict | None = None,
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": "application/gzip", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self.wfile.flush()
        self.close_connection = True


def cut_short(h: Handler, body: bytes) -> None:
    """Announce the whole file, send half of it, hang up."""
    h.reply(200, body[: len(body) // 2], length=len(body))


def status(code: int, **headers: str):
    return lambda h, body: h.reply(code, b"", headers={k.replace("_", "-"): v for k, v in headers.items()})


class Site(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, files: dict[str, bytes], auth: str | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.auth = dict(files), auth
        self.script: list = []  # behaviours for the next GETs, in order; then plain serving
        self.hold = None  # called before answering each GET
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()

    def url(self, path: str, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.server_address[1]}{path}"

    @property
    def gets(self) -> list[tuple[str, dict]]:
        return [(p, h) for m, p, h in self.requests if m == "GET"]


@pytest.fixture
def site():
    sites: list[Site] = []

    def start(files: dict[str, bytes], auth: str | None = None) -> Site:
        s = Site(files, auth)
        threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True).start()
        sites.append(s)
        return s

    yield start
    for s in sites:
        s.shutdown()
        s.server_close()


# --- small archives and helpers ------------------------------------------------------------

def tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_600_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tiny_members(per_folder: int) -> dict[str, bytes]:
    """The first `per_folder` real PNGs of each mnist_tiny/{train,valid}/{3,7}/ folder."""
    out: dict[str, bytes] = {}
    seen: Counter = Counter()
    with tarfile.open(TINY) as tf:
        for m in tf.getmembers():
            parts = m.name.split("/")
            folder = "/".join(parts[:3])
            if m.isfile() and len(parts) == 4 and parts[1] in ("train", "valid") and seen[folder] < per_folder:
                seen[folder] += 1
                out[m.name] = tf.extractfile(m).read()
    return out


def normalised(report: dict, root: Path) -> dict:
    """A report with its storage root replaced, to compare runs on different roots."""
    return json.loads(json.dumps(report).replace(str(root), "<root>"))


def finished(stderr: str) -> list[tuple[str, str]]:
    """(task, final state) per task run; the random suffix of unmapped task names dropped."""
    found = re.findall(r"Task run '([\w.-]+)' - Finished in state (\w+)", stderr)
    return [(re.sub(r"^(download|untar|templates|report)-[0-9a-f]+$", r"\1", t), s) for t, s in found]


def published_is_whole(root: Path) -> None:
    """Everything under a final name is complete: folders match their manifests."""
    r = Root(str(root))
    for manifest in root.rglob(MANIFEST):
        folder = manifest.parent.relative_to(root).as_posix()
        if ".tmp-" not in folder:
            r.verify(folder)


def popen(cli: Cli, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [PIXELSIM, *args]
    if "--root" not in args:
        cmd += ["--root", str(cli.root)]
    return subprocess.Popen(cmd, env={**cli.env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cli.root.parent)


def wait(p: subprocess.Popen, timeout: float = 300) -> Result:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"run did not finish within {timeout}s (hung on a lock?):\n{err[-3000:]}")
    return Result(p.returncode, out, err)


# --- network, end to end -------------------------------------------------------------------

def test_body_cut_short_then_503_then_ok_still_gives_the_right_figures(cli, site):
    s = site({"/mnist_tiny.tgz": TINY_BYTES})
    s.script = [cut_short, status(503)]  # then the whole file, ignoring the resume's Range
    r = cli("run", "--source", s.url("/mnist_tiny.tgz"), "--json")
    assert r.code == 0, r.stderr
    assert_figures(r.report, TINY_FIGURES)
    assert r.report["source"]["sha256"] == TINY_SHA and r.report["source"]["bytes"] == len(TINY_BYTES)
    half = len(TINY_BYTES) // 2
    assert [h.get("Range") for _, h in s.gets] == [None, f"bytes={half}-", f"bytes={half}-"]
    assert "failed (attempt 1/4): RemoteProtocolError" in r.stderr  # each retry is logged
    assert "failed (attempt 2/4): HTTP 503" in r.stderr
    # nothing partial anywhere: one archive folder, its manifest listing the archive's bytes
    (folder,) = (cli.root / "archives").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "mnist_tiny.tgz"]
    assert [(f["name"], f["sha256"]) for f in Root(str(cli.root)).verify(f"archives/{folder.name}")["files"]] == \
        [("mnist_tiny.tgz", TINY_SHA)]


def test_404_fails_fast_naming_the_url(cli, site):
    s = site({})
    url = s.url("/gone/mnist_tiny.tgz")
    r = cli("run", "--source", url)
    assert r.code == 1
    assert f"pixelsim: error: {url}: HTTP 404" in r.stderr
    assert len(s.gets) == 1  # not retried, by fetch nor by Prefect
    assert not (cli.root / "archives").exists() or not any(p.is_file() for p in (cli.root / "archives").rglob("*"))


def test_changed_archive_at_the_same_url_is_a_cache_miss(cli, site):
    a, b = tgz(tiny_members(6)), tgz(tiny_members(7))
    s = site({"/data.tgz": a})
    first = cli("run", "--source", s.url("/data.tgz"), "--json")
    assert first.code == 0, first.stderr
    s.files["/data.tgz"] = b
    second = cli("run", "--source", s.url("/data.tgz"), "--json")
    assert second.code == 0, second.stderr
    assert first.report["source"]["sha256"] == hashlib.sha256(a).hexdigest()
    assert second.report["source"]["sha256"] == hashlib.sha256(b).hexdigest()
    assert second.report["counts"]["train"] == {"3": 7, "7": 7}
    assert ("download", "Completed") in finished(second.stderr)


# --- images --------------------------------------------------------------------------------

def _png(value: int, size: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, "PNG")
    return buf.getvalue()


def test_bad_images_are_all_listed_or_skipped_within_budget(cli, site):
    members = tiny_members(5)
    flipped = bytearray(_png(90))
    flipped[flipped.index(b"IDAT") + 6] ^= 0x10
    bad = {"mnist_tiny/train/3/truncated.png": _png(10)[:60],
           "mnist_tiny/train/7/flipped.png": bytes(flipped),
           "mnist_tiny/valid/3/notes.png": b"these are notes, not pixels\n"}
    s = site({"/bad.tgz": tgz({**members, **bad})})
    url = s.url("/bad.tgz")

    failed = cli("run", "--source", url)
    assert failed.code == 1
    for name, why in zip(bad, ["truncated PNG", "fails its CRC check", "not a PNG or JPEG"]):
        assert re.search(rf"{re.escape(name)}: .*{why}", failed.stderr), (name, failed.stderr[-2000:])
    assert "3 bad image file(s)" in failed.stderr
    assert list(cli.root.glob("shards/*/*/*.parquet")) == []

    ok = cli("run", "--source", url, "--skip-bad", "3", "--json")
    assert ok.code == 0, ok.stderr
    rep = ok.report
    assert [x.split(":")[0] for x in rep["skipped"]] == sorted(bad)
    assert rep["counts"] == {"train": {"3": 5, "7": 5}, "valid": {"3": 5, "7": 5}}
    md = (Path(rep["artifacts"]["report"]) / "report.md").read_text()
    assert "## Skipped bad files (3)" in md and all(name in md for name in bad)
    # left out, never zero-filled: the shards hold exactly the good files
    table = pq.read_table(rep["artifacts"]["shards"], columns=["path"])
    assert sorted(table.column("path").to_pylist()) == sorted(members)

    over = cli("run", "--source", url, "--skip-bad", "2")
    assert over.code == 1
    assert all(name in over.stderr for name in bad)


# --- storage -------------------------------------------------------------------------------

def test_truncated_shard_is_detected_and_rebuilt(cli, site):
    s = site({"/small.tgz": tgz(tiny_members(8))})
    url = s.url("/small.tgz")
    first = cli("run", "--source", url, "--json")
    assert first.code == 0, first.stderr
    shards = Path(first.report["artifacts"]["shards"])
    manifest = json.loads((shards / MANIFEST).read_text())
    # the manifest (written last) carries each file's size, sha256 and, for shards, row count
    assert {e["name"] for e in manifest["files"]} == {*manifest["rows"], "_plan/members.parquet"}
    for name, rows in manifest["rows"].items():
        assert pq.ParquetFile(shards / name).metadata.num_rows == rows
    shard = shards / "train-00000-of-00001.parquet"
    body = shard.read_bytes()
    shard.write_bytes(body[: len(body) // 2])

    second = cli("run", "--source", url, "--json")
    assert second.code == 0, second.stderr
    assert "convert-train-00000: cached result no longer valid" in second.stderr
    assert "recomputing" in second.stderr
    assert second.report == first.report
    assert shard.read_bytes() == body


def test_an_image_changed_after_extraction_is_not_decoded(tmp_path):
    from pixelsim.storage.errors import IntegrityError
    from pixelsim.storage.shards import Member
    from pixelsim.tasks.convert import read_image, read_members, tree_entries
    from pixelsim.tasks.download import download_archive
    from pixelsim.tasks.untar import untar_archive

    (tmp_path / "a.tgz").write_bytes(tgz(tiny_members(1)))
    root = str(tmp_path / "root")
    tree = untar_archive(download_archive(str(tmp_path / "a.tgz"), root).value).value
    name, (offset, size, sha) = next(iter(tree_entries(tree).items()))
    entry = Member(name, 0, sha, size, offset)
    (data,) = read_members(tree, [entry])
    assert read_image(data, entry, channels=1, size=None, resize=False).shape == (28, 28)
    blob = Path(root) / tree.dir / "members.bin"
    with open(blob, "r+b") as f:  # the same length, other bytes: a bit flip on disk after unpacking
        f.seek(offset + size - 5)
        f.write(bytes(b ^ 0xFF for b in data[-5:]))
    (changed,) = read_members(tree, [entry])
    with pytest.raises(IntegrityError, match=f"{re.escape(name)}: its bytes in the unpacked archive changed"):
        read_image(changed, entry, channels=1, size=None, resize=False)


@pytest.mark.parametrize("target", ["members.bin", "members.parquet"])
def test_a_damaged_unpacking_is_unpacked_again_and_the_figures_stay_right(tmp_path, target, caplog):
    """One flipped bit in the cached members blob or its index: the next run notices (the index
    by its hash, the blob member by member), unpacks the archive again and reports the same
    figures as a clean run, never other counts and never a failure until --refresh."""
    import pixelsim

    (tmp_path / "a.tgz").write_bytes(tgz(tiny_members(12)))
    root, clean_root = str(tmp_path / "root"), str(tmp_path / "clean")
    first = pixelsim.run(source=str(tmp_path / "a.tgz"), dataset="flip", root=root)
    path = Path(root) / first.outputs.tree.dir / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    for stale in Path(root).glob("shards/flip/*"):   # so convert reads the damaged members again
        shutil.rmtree(stale)
    with caplog.at_level("WARNING"):
        again = pixelsim.run(source=str(tmp_path / "a.tgz"), dataset="flip", root=root)
    clean = pixelsim.run(source=str(tmp_path / "a.tgz"), dataset="flip", root=clean_root)
    assert again.report["metrics"] == clean.report["metrics"] == first.report["metrics"]
    assert again.report["counts"] == clean.report["counts"]
    assert path.read_bytes() != bytes(data)                     # healed
    assert ("unpacking the archive again" if target == "members.bin" else "no longer valid") in caplog.text


# --- crashes and concurrency ---------------------------------------------------------------

def test_a_run_killed_before_each_publication_recovers_to_a_clean_runs_report(cli, site, tmp_path):
    s = site({"/small.tgz": tgz(tiny_members(8))})
    url = s.url("/small.tgz")
    clean = cli("run", "--source", url, "--json", "--root", str(tmp_path / "clean"))
    assert clean.code == 0, clean.stderr
    want = normalised(clean.report, tmp_path / "clean")

    def crash_then_rerun(point: str) -> list[str]:
        root = tmp_path / f"crash-{point}"
        killed = cli("run", "--source", url, "--json", "--root", str(root),
                     env={"PIXELSIM_CRASH_AT": f"publish:{point}"}, timeout=240)
        problems = []
        if killed.code != -9:  # the crash point was reached, and SIGKILL is what ended the run
            problems.append(f"{point}: killed run exited {killed.code}: {killed.stderr[-1500:]}")
        try:
            published_is_whole(root)
        except Exception as e:  # noqa: BLE001 - reported with the point
            problems.append(f"{point}: partial artifact after the crash: {e}")
        try:  # a stale lock would make this wait for an hour
            again = cli("run", "--source", url, "--json", "--root", str(root), timeout=240)
        except subprocess.TimeoutExpired:
            return problems + [f"{point}: rerun hung"]
        if again.code != 0:
            problems.append(f"{point}: rerun failed: {again.stderr[-1500:]}")
        elif normalised(again.report, root) != want:
            problems.append(f"{point}: rerun's report differs from a clean run's")
        return problems

    with ThreadPoolExecutor(3) as pool:
        problems = [p for ps in pool.map(crash_then_rerun, CRASH_POINTS) for p in ps]
    assert problems == []


def test_simultaneous_runs_on_one_root_do_each_step_once(cli, site, tmp_path):
    s = site({"/small.tgz": tgz(tiny_members(8))})

    def all_three_asked() -> None:
        """Answer the first GET only once every run has looked the file up (HEAD), and a
        moment later: all three are then at the download step together."""
        deadline = time.time() + 120
        while sum(m == "HEAD" for m, _, _ in s.requests) < 3 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)

    s.hold = all_three_asked
    env = {"PIXELSIM_LOCK_DIR": str(tmp_path / "locks")}  # same PREFECT_LOCAL_STORAGE_PATH too
    runs = [popen(cli, "run", "--source", s.url("/small.tgz"), "--json", env=env) for _ in range(3)]
    results = [wait(p, 300) for p in runs]
    for r in results:
        assert r.code == 0, r.stderr
    assert results[0].report == results[1].report == results[2].report
    states = [x for r in results for x in finished(r.stderr)]
    completed = Counter(t for t, st in states if st == "Completed")
    tasks = {t for t, _ in states}
    assert tasks == {"download", "untar", "convert-train-00000", "convert-valid-00000", "templates",
                     "evaluate-00000", "report"}
    assert completed == Counter(tasks), completed  # each piece of work done once...
    assert Counter(st for _, st in states) == {"Completed": 7, "Cached": 14}  # ...the others reused it
    assert len(s.gets) == 1


def _children(pid: int) -> dict[int, tuple[str | None, str]]:
    """The live children of `pid`: their identity (to tell a reused pid) and command line."""
    from pixelsim.storage.locks import identity

    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                child = int(stat.parent.name)
                found[child] = (identity(child), (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_a_run_killed_mid_run_leaves_no_temporary_server_behind(tmp_path):
    """No PREFECT_API_URL: the run's temporary Prefect server is its child. SIGKILLed while it
    downloads, the run runs no exit handler; its children (the server included) are still gone
    within a bounded wait, instead of the server living on under init."""
    from pixelsim.storage.locks import alive

    asked, hold = threading.Event(), threading.Event()

    class Stall(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()

        def do_GET(self) -> None:   # the download waits here until the test is over
            asked.set()
            hold.wait(120)

        def log_message(self, *args) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    env = {**base_env(tmp_path / "home"), "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    with open(tmp_path / "log", "w") as log:
        p = subprocess.Popen([PIXELSIM, "run", "--source", f"http://127.0.0.1:{srv.server_address[1]}/x.tgz",
                              "--root", str(tmp_path / "root")], env=env, stdout=log, stderr=log)
    children: dict[int, tuple[str | None, str]] = {}
    try:
        assert asked.wait(240), (tmp_path / "log").read_text()[-3000:]   # mid-run: in the download step
        children = _children(p.pid)
        assert any("uvicorn" in cmd for _, cmd in children.values()), children   # the temporary server
        p.kill()
        p.wait()
        deadline = time.monotonic() + 20
        while (left := {c: v for c, v in children.items() if alive(c, v[0])}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == {}, f"still running 20 s after the run was killed: {left}"
    finally:
        hold.set()
        if p.poll() is None:
            p.kill()
        for child, (ident, _) in children.items():   # only this run's own children, by pid
            if alive(child, ident):
                os.kill(child, 9)
        srv.shutdown()
        srv.server_close()


def test_a_dead_holders_lock_is_broken_at_once(tmp_path):
    from pixelsim.storage.locks import HOST, ExpiringLockManager

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "k.lock").write_text(json.dumps({"holder": "x", "expiration": "2999-01-01 00:00:00+00:00",
                                                 "host": HOST, "pid": dead.pid}))
    m = ExpiringLockManager(tmp_path)
    assert not m.is_locked("k") and not (tmp_path / "k.lock").exists()
    assert m.acquire_lock("k", "me", acquire_timeout=1)
    assert json.loads((tmp_path / "k.lock").read_text())["pid"] == os.getpid()
    m.release_lock("k", "me")


def test_a_lock_whose_pid_now_belongs_to_another_process_is_broken_at_once(tmp_path, caplog):
    """After a container restart a dead run's pid can belong to a live process: the lock records
    the holder's identity (boot id and start time), so such a lock does not hold for an hour."""
    from pixelsim.storage.locks import HOST, ExpiringLockManager, identity

    other = subprocess.Popen(["sleep", "30"])
    try:
        m = ExpiringLockManager(tmp_path)
        lock = {"holder": "x", "expiration": "2999-01-01 00:00:00+00:00", "host": HOST, "pid": other.pid}
        (tmp_path / "k.lock").write_text(json.dumps({**lock, "identity": identity(other.pid)}))
        assert m.is_locked("k")                            # its own live holder: held
        with caplog.at_level("INFO", logger="pixelsim"):
            assert not m.acquire_lock("k", "me", acquire_timeout=0.3)
        assert f"held by x (pid {other.pid} on {HOST})" in caplog.text     # a wait says who is in the way
        stale = identity(other.pid).rsplit(":", 1)[0] + ":1"               # same pid, an earlier process
        (tmp_path / "k.lock").write_text(json.dumps({**lock, "identity": stale}))
        assert not m.is_locked("k") and not (tmp_path / "k.lock").exists()
        assert m.acquire_lock("k", "me", acquire_timeout=1)
        assert json.loads((tmp_path / "k.lock").read_text())["identity"] == identity(os.getpid())
        m.release_lock("k", "me")
    finally:
        other.kill()
        other.wait()


def test_a_lock_from_another_host_holds_while_its_heartbeat_runs_and_is_broken_once_it_stops(tmp_path, monkeypatch):
    """Containers on one volume: a holder on another host cannot be asked whether it lives, so
    holders touch their lock files (a heartbeat) and a lock left untouched for STALE_S is broken."""
    from pixelsim.storage import locks

    m = locks.ExpiringLockManager(tmp_path)
    path = tmp_path / "k.lock"
    path.write_text(json.dumps({"holder": "x", "expiration": "2999-01-01 00:00:00+00:00", "host": "containerA",
                                "pid": os.getpid() + 1}))
    assert m.is_locked("k") and not m.acquire_lock("k", "me", acquire_timeout=0.3)   # fresh: held
    old = time.time() - locks.STALE_S - 5   # its holder was killed: no heartbeat since
    os.utime(path, (old, old))
    assert m.acquire_lock("k", "me", acquire_timeout=1) and m.is_lock_holder("k", "me")
    # our own heartbeat keeps the lock we hold fresh
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(locks, "_beating", None)
    os.utime(path, (old, old))
    m.release_lock("k", "me")
    assert m.acquire_lock("k", "me", acquire_timeout=1)
    os.utime(path, (old, old))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 1 and not m._stale("k")
    m.release_lock("k", "me")
    assert not path.exists()


def test_a_dead_lock_stamped_in_the_future_is_broken_once_it_stays_untouched(tmp_path, monkeypatch):
    """A holder whose clock ran a day ahead (another host) left its lock: the file's age says
    nothing, so a waiter watches it on its own clock and breaks it after STALE_S unchanged."""
    from pixelsim.storage import locks

    monkeypatch.setattr(locks, "STALE_S", 0.5)
    m = locks.ExpiringLockManager(tmp_path)
    path = tmp_path / "k.lock"
    path.write_text(json.dumps({"holder": "x", "expiration": time.time() + 86400 + 3600, "host": "containerA",
                                "pid": 1}))
    ahead = time.time() + 86400
    os.utime(path, (ahead, ahead))
    assert m.is_locked("k")                                   # just seen: held
    started = time.monotonic()
    assert m.acquire_lock("k", "me", acquire_timeout=5) and m.is_lock_holder("k", "me")
    assert 0.4 < time.monotonic() - started < 3
    m.release_lock("k", "me")
    # a holder whose heartbeat still touches the file keeps it, however far ahead its clock
    path.write_text(json.dumps({"holder": "x", "expiration": ahead, "host": "containerA", "pid": 1}))
    for beat in range(8):
        os.utime(path, (ahead + 100 + beat, ahead + 100 + beat))
        assert m.is_locked("k")
        time.sleep(0.2)


def test_a_lock_file_caught_mid_write_counts_as_held(tmp_path):
    """Prefect creates a lock file empty, then writes it: a concurrent run reading it in between
    must wait, not crash (seen as 'EOF while parsing' failures of simultaneous runs)."""
    from pixelsim.storage.locks import ExpiringLockManager

    m = ExpiringLockManager(tmp_path)
    path = tmp_path / "k.lock"
    for partial in (b"", b'{"holder": "a", "expi'):
        path.write_bytes(partial)
        assert m.is_locked("k") and not m.is_lock_holder("k", "me")
        assert not m.acquire_lock("k", "me", acquire_timeout=0.3)
    old = time.time() - 60  # left half-written by a holder killed in between: broken
    os.utime(path, (old, old))
    assert m.acquire_lock("k", "me", acquire_timeout=1) and m.is_lock_holder("k", "me")
    m.release_lock("k", "me")
    assert not path.exists() and list(tmp_path.iterdir()) == []


# --- secrets and surfaces ------------------------------------------------------------------

def _loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("::1", "::ffff:127.0.0.1")


def _listening(pid: int) -> set[tuple[str, int]]:
    """TCP sockets in LISTEN state held by `pid` or any of its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    inodes = set()
    for p in tree:
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                link = os.readlink(f"/proc/{p}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for proto in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:
                continue
            host, port = f[1].split(":")
            raw = bytes.fromhex(host)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw), int(port, 16)))
    return found


def test_credentials_never_leak_and_nothing_listens_beyond_loopback(tmp_path, site):
    """No PREFECT_API_URL: the run starts its own temporary Prefect server, whose database
    (flow run parameters, logs, artifacts) lives under PREFECT_HOME, scanned below."""
    token = "tok-9c1f2e7a"
    s = site({"/x.tgz": tgz(tiny_members(5))}, auth="Basic " + base64.b64encode(b"user:secret").decode())
    url = s.url(f"/x.tgz?token={token}", userinfo="user:secret@")
    home, results, root = tmp_path / "home", tmp_path / "results", tmp_path / "root"
    env = {**base_env(home), "PREFECT_LOCAL_STORAGE_PATH": str(results)}
    p = popen(Cli(env, root), "run", "--source", url)
    seen: set[tuple[str, int]] = set()
    probe = Path("/proc/net/tcp").exists()
    while probe and p.poll() is None:
        seen |= _listening(p.pid)
        time.sleep(0.2)
    r = wait(p, 300)
    assert r.code == 0, r.stderr
    assert all(h.get("Authorization") for _, _, h in s.requests)  # the credentials were used...
    assert "secret" not in r.stdout and "secret" not in r.stderr and token not in r.stdout + r.stderr
    assert "x.tgz?token=***" in r.stdout  # ...and shown redacted
    leaks = [str(f) for base in (root, results) for f in base.rglob("*")
             if f.is_file() and (b"secret" in f.read_bytes() or token.encode() in f.read_bytes())]
    # Prefect's own database knows a 'Secret' block type: look for the URL's parts there
    leaks += [str(f) for f in home.rglob("*") if f.is_file()
              and any(x in f.read_bytes() for x in (b"user:secret", b"secret@", token.encode()))]
    assert leaks == []
    if probe:
        assert seen, "the temporary Prefect server was never seen listening"
        assert all(_loopback(addr) for addr, _ in seen), seen


def test_fingerprint_errors_do_not_echo_credentials(monkeypatch):
    import fsspec

    from pixelsim.storage import sources
    from pixelsim.storage.errors import DownloadError

    def boom(url, **kw):  # a backend whose error message repeats the URL it was given
        raise RuntimeError(f"cannot reach {url}")

    monkeypatch.setattr(fsspec.core, "url_to_fs", boom)
    with pytest.raises(DownloadError) as err:
        sources.fingerprint("ftp://alice:hunter2@files.example/x.tgz")
    assert "hunter2" not in str(err.value) and "alice" not in str(err.value)
    assert "files.example/x.tgz" in str(err.value)


def test_local_dask_cluster_binds_loopback_only():
    pytest.importorskip("prefect_dask")
    from pixelsim.flows.prefect_runner import task_runner

    runner = task_runner("dask", workers=1)
    assert runner.cluster_kwargs["host"] == "127.0.0.1" and runner.cluster_kwargs["dashboard_address"] is None


def test_members_no_step_can_use_are_not_stored(tmp_path):
    """A small archive of a huge non-image member (40 MB of zeros, 40 kB compressed) costs no
    disk: non-images are indexed, not stored; one inside a class folder is still named."""
    import pixelsim
    from pixelsim.tasks.convert import BadImages

    members = {**tiny_members(4), "mnist_tiny/blob.bin": bytes(40 * 2**20)}
    (tmp_path / "a.tgz").write_bytes(tgz(members))
    root = str(tmp_path / "root")
    out = pixelsim.run(source=str(tmp_path / "a.tgz"), dataset="big", root=root)
    blob = Path(root) / out.outputs.tree.dir / "members.bin"
    assert blob.stat().st_size == sum(len(v) for k, v in members.items() if k.endswith(".png"))
    (tmp_path / "b.tgz").write_bytes(tgz({**tiny_members(4), "mnist_tiny/train/3/notes.txt": b"hello"}))
    with pytest.raises(BadImages, match=r"mnist_tiny/train/3/notes.txt: unknown image extension"):
        pixelsim.run(source=str(tmp_path / "b.tgz"), dataset="notes", root=root)


def test_a_folder_source_holding_its_own_storage_root_leaves_the_root_out(tmp_path):
    """`--source .` with the default root inside it: the root is neither packed nor
    fingerprinted, so reruns are cache hits and the root does not grow with every run."""
    import pixelsim

    folder = tmp_path / "photos"
    with tarfile.open(TINY) as tf:
        tf.extractall(folder, filter="data")
    root = folder / "pixelsim-data"
    first = pixelsim.run(source=str(folder), dataset="self", root=str(root))
    archive = Path(root) / first.outputs.archive.file
    again = pixelsim.run(source=str(folder), dataset="self", root=str(root))
    assert all(again.cached.values()), again.cached
    assert again.outputs.archive.file == first.outputs.archive.file
    with tarfile.open(archive) as tf:
        assert not [n for n in tf.getnames() if "pixelsim-data" in n]
    clean = pixelsim.run(source=str(TINY), root=str(tmp_path / "clean"))
    assert first.report["counts"] == clean.report["counts"] and first.report["metrics"] == clean.report["metrics"]
