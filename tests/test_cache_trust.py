"""What the cache trusts is checked by content: a folder holding another output, a changed byte
in a manifest or a part's record, a file turned into a folder. Each is rebuilt, never believed,
and the readers (`pixelsim show`, the API) refuse what a run would rebuild."""
from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import pixelsim
from conftest import TINY, TINY_FIGURES, assert_figures
from pixelsim.storage.cache import load_part, record_part
from pixelsim.storage.errors import IntegrityError, PixelsimError
from pixelsim.storage.root import Root


def swapped_tiny(path: Path) -> Path:
    """mnist_tiny with its validation 3s and 7s swapped: other figures, the same layout."""
    with tarfile.open(TINY) as src, tarfile.open(path, "w") as out:
        for ti in src:
            data = src.extractfile(ti).read() if ti.isfile() else None
            for a, b in (("/valid/3/", "/valid/x/"), ("/valid/7/", "/valid/3/"), ("/valid/x/", "/valid/7/")):
                ti.name = ti.name.replace(a, b) if a in ti.name else ti.name
            out.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def only(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def two_runs(tmp_path):
    """mnist_tiny and its swapped twin, run into one root under one dataset name."""
    root = tmp_path / "root"
    run = dict(root=str(root), dataset="mnist_tiny", shard_size=300)
    first = pixelsim.run(source=str(TINY), **run)
    other = pixelsim.run(source=str(swapped_tiny(tmp_path / "twin.tar")), **run)
    assert other.report["metrics"]["l1"]["per_class"] != first.report["metrics"]["l1"]["per_class"]
    return root, run, first, other


@pytest.mark.parametrize("output,step", [("report", "report"), ("evaluation", "evaluate"),
                                         ("templates", "templates"), ("shards", "convert")])
def test_a_folder_holding_another_output_is_rebuilt(two_runs, output, step):
    root, run, first, other = two_runs
    mine, theirs = (o.outputs.folders()[output] for o in (first, other))
    shutil.rmtree(root / mine)
    shutil.copytree(root / theirs, root / mine)   # another output's verified folder, under this key
    again = pixelsim.run(source=str(TINY), **run)
    assert_figures(again.report, TINY_FIGURES)
    assert not again.cached[step]


def test_a_changed_figure_in_a_manifest_is_caught(tmp_path):
    root = tmp_path / "root"
    first = pixelsim.run(source=str(TINY), root=str(root), shard_size=300)
    manifest = root / first.outputs.folders()["evaluation"] / "_manifest.json"
    body = json.loads(manifest.read_text())
    part = next(iter(body["record"]["parts"].values()))
    cells = part["confusion"]["l1"]
    cells[0][2] -= 100   # one true-3-predicted-3 count, in the part record the metrics are summed from
    manifest.write_text(json.dumps(body, indent=1))
    again = pixelsim.run(source=str(TINY), root=str(root), shard_size=300)
    assert_figures(again.report, TINY_FIGURES) and not again.cached["evaluate"]


def test_a_changed_part_record_is_caught(tmp_path):
    r = Root(str(tmp_path))
    r.write_bytes_atomic("out/_parts/a.bin", b"part")
    record = {"file": "out/a.bin", "sha256": Root(str(tmp_path)).sha256("out/_parts/a.bin")[0], "bytes": 4,
              "counts": {"3": 10}}
    record_part(r, "out/a.bin", record)
    assert load_part(r, "out/a.bin") == record
    rec = tmp_path / "out/_parts/a.bin.json"
    rec.write_text(rec.read_text().replace('"3":10', '"3":90'))
    with pytest.raises(IntegrityError, match="altered"):
        load_part(r, "out/a.bin")


def test_a_lock_folder_outside_the_root_is_never_deleted_even_when_it_is_a_file(tmp_path, monkeypatch):
    """Only the root's own `_locks` is repaired (below): a file where any other lock folder goes
    stays as it is and the step fails naming it, whichever way the steps are called."""
    from pixelsim.storage.cache import reuse_or_build
    from pixelsim.storage.locks import ExpiringLockManager

    notes = tmp_path / "notes.txt"
    notes.write_text("precious notes")
    with pytest.raises(PixelsimError, match="notes.txt: not a folder"):
        ExpiringLockManager(notes).acquire_lock("k", "me", acquire_timeout=1)
    monkeypatch.setenv("PIXELSIM_LOCK_DIR", str(notes))   # past the check of the request: the steps alone
    with pytest.raises(PixelsimError, match=r"PIXELSIM_LOCK_DIR=.*notes\.txt': not a folder"):
        reuse_or_build(Root(str(tmp_path / "root")), "templates/x/k", lambda: None, lambda: "built")
    assert notes.read_text() == "precious notes"


def test_a_file_turned_into_a_folder_is_rebuilt(tmp_path):
    root = tmp_path / "root"
    first = pixelsim.run(source=str(TINY), root=str(root), shard_size=300)
    templates = only(root, "templates/mnist_tiny/*/templates.parquet")
    templates.unlink()
    templates.mkdir()
    manifest = only(root, "shards/mnist_tiny/*/_manifest.json")
    manifest.unlink()
    manifest.mkdir()
    shutil.rmtree(root / "_locks", ignore_errors=True)
    (root / "_locks").write_text("not a folder")
    again = pixelsim.run(source=str(TINY), root=str(root), shard_size=300)
    assert_figures(again.report, TINY_FIGURES)
    assert not again.cached["convert"] and not again.cached["templates"]
    assert first.report["metrics"] == again.report["metrics"]
    # the files that mapped tasks publish one by one (a shard, a predictions file), and the unpacking
    for pattern in ("shards/mnist_tiny/*/train-00000-of-00003.parquet",
                    "evaluations/mnist_tiny/*/predictions-valid-00000-of-00003.parquet", "extracted/*/members.bin"):
        part = only(root, pattern)
        part.unlink()
        (part / "inside").mkdir(parents=True)
    third = pixelsim.run(source=str(TINY), root=str(root), shard_size=300)
    assert first.report["metrics"] == third.report["metrics"]
    assert not third.cached["untar"] and not third.cached["convert"] and not third.cached["evaluate"]
    assert only(root, "shards/mnist_tiny/*/train-00000-of-00003.parquet").is_file()


def test_readers_refuse_a_damaged_report(tmp_path):
    from pixelsim.flows.show import find_run

    root = tmp_path / "root"
    first = pixelsim.run(source=str(TINY), root=str(root), shard_size=300)
    folder = first.report["artifacts"]["report"]
    page = Path(folder) / "report.json"
    page.write_text(page.read_text().replace("0.8829", "0.1111"))
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        pixelsim.open(str(root)).latest("mnist_tiny").report
    for target in (folder, first.run_id):
        with pytest.raises(PixelsimError, match="report.json: does not match its manifest.*rebuilds it"):
            find_run(str(root), target)


def test_a_truncated_download_says_how_to_fetch_it_again(tmp_path):
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(TINY.read_bytes()[:200_000])   # what a server that under-reports its length leaves
    with pytest.raises(PixelsimError, match=r"corrupt or truncated archive.*`pixelsim run --refresh` fetches it again"):
        pixelsim.run(source=str(cut), root=str(tmp_path / "root"))


def test_a_shard_size_that_makes_hundreds_of_tasks_is_warned_about(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="pixelsim"):
        rep = pixelsim.run(source=str(TINY), root=str(tmp_path / "root"), shard_size=5).report
    assert_figures(rep, TINY_FIGURES)
    assert "280 shards of at most 5 images: each is a task of its own" in caplog.text


def test_a_fifo_or_a_link_to_an_endless_device_in_the_root_is_rebuilt_without_hanging(tmp_path):
    """A FIFO would block a reader for ever and /dev/zero never ends: both are damage, rebuilt."""
    root = tmp_path / "root"
    first = pixelsim.run(source=str(TINY), root=str(root), shard_size=300)
    os.symlink("/dev/zero", _replace(only(root, "extracted/*/members.bin")))
    os.symlink("/dev/zero", _replace(only(root, "shards/mnist_tiny/*/train-00001-of-00003.parquet")))
    os.mkfifo(_replace(only(root, "templates/mnist_tiny/*/templates.parquet")))
    os.mkfifo(_replace(only(root, "evaluations/mnist_tiny/*/_manifest.json")))
    script = ("import json, pixelsim\n"
              f"r = pixelsim.run(source={str(TINY)!r}, root={str(root)!r}, shard_size=300)\n"
              "print(json.dumps([r.report['metrics'], r.cached]))\n")
    memory = 4 << 30   # reading /dev/zero whole would pass this long before the timeout
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (memory, memory)))
    assert done.returncode == 0, done.stderr[-2000:]
    metrics, cached = json.loads(done.stdout.splitlines()[-1])
    assert metrics == first.report["metrics"]
    assert not any(cached[step] for step in ("untar", "convert", "templates", "evaluate"))


def _replace(path: Path) -> Path:
    path.unlink()
    return path


def swapped_tiny(dest: Path, swap: bool = True) -> Path:
    """mnist_tiny with its 3s and 7s folders exchanged: other bytes, mirrored figures (a plain
    tar for a .tar `dest`: then the same size as the unswapped one, `swap=False`)."""
    with tarfile.open(TINY) as src, tarfile.open(dest, "w" if dest.suffix == ".tar" else "w:gz") as out:
        for m in src:
            data = src.extractfile(m).read() if m.isfile() else None
            if swap:
                m.name = m.name.replace("/3/", "/\0/").replace("/7/", "/3/").replace("/\0/", "/7/")
            out.addfile(m, io.BytesIO(data) if data is not None else None)
    return dest


def test_sources_whose_urls_differ_only_in_a_masked_value_never_share_a_cached_download(tmp_path):
    """`?key=a` and `?key=b` show (and key) alike, since a key-like value is masked as a
    credential; a server that refuses HEAD (as presigned URLs do) gives no version to tell them
    apart. Such a source is fetched again: the second run has its own archive's figures."""
    import http.server
    import threading
    from urllib.parse import parse_qs, urlsplit

    files = {"tiny": TINY.read_bytes(), "swapped": swapped_tiny(tmp_path / "s.tgz").read_bytes()}

    class Objects(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(405)
            self.end_headers()

        def do_GET(self):
            body = files[parse_qs(urlsplit(self.path).query)["key"][0]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Objects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/get.tgz?key="
        root = str(tmp_path / "root")
        first = pixelsim.run(source=url + "tiny", root=root, dataset="objects")
        assert_figures(first.report, TINY_FIGURES)
        second = pixelsim.run(source=url + "swapped", root=root, dataset="objects")
        mirrored = {m: {"3": f["7"], "7": f["3"], "balanced": f["balanced"]} for m, f in TINY_FIGURES.items()}
        assert_figures(second.report, mirrored)
        assert second.report["source"]["sha256"] != first.report["source"]["sha256"]
        again = pixelsim.run(source=url + "tiny", root=root, dataset="objects")   # fetched, then all by content
        assert_figures(again.report, TINY_FIGURES)
        assert again.cached["untar"] and again.cached["convert"] and not again.cached["download"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_cached_download_is_trusted_only_on_a_fingerprint_that_names_a_version():
    from pixelsim.storage.sources import identifies
    plain, signed = "https://h/d.tgz", "https://h/d.tgz?X-Amz-Signature=abc"
    assert identifies(plain, {"etag": '"1"'}) and identifies(plain, {"last-modified": "Tue", "content-length": "9"})
    assert identifies("/data/d.tgz", {"size": "9", "mtime": "1.5"}) and identifies("/data", {"folder": "ab", "files": 3})
    assert not identifies(plain, {"status": 405}) and not identifies(plain, {}) and not identifies(plain, {"content-length": "9"})
    assert identifies(signed, {"etag": '"1"'}) and not identifies(signed, {"last-modified": "Tue"})
    assert not identifies("https://user:pw@h/d.tgz", {"last-modified": "Tue"})


def test_a_local_source_replaced_by_other_bytes_of_the_same_size_and_mtime_is_read_again(tmp_path):
    """`cp -p`, `rsync -t` and unpacking keep a file's mtime; with the same size as well, the
    source's fingerprint was unchanged and the old archive's figures came back, exit 0."""
    tiny, swapped = swapped_tiny(tmp_path / "t.tar", swap=False), swapped_tiny(tmp_path / "s.tar")
    assert tiny.stat().st_size == swapped.stat().st_size and tiny.read_bytes() != swapped.read_bytes()
    mirrored = {m: {"3": f["7"], "7": f["3"], "balanced": f["balanced"]} for m, f in TINY_FIGURES.items()}
    data, root = tmp_path / "data.tar", str(tmp_path / "root")
    for source, figures in ((tiny, TINY_FIGURES), (swapped, mirrored), (tiny, TINY_FIGURES)):
        shutil.copyfile(source, data)
        os.utime(data, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))   # as cp -p would leave it
        assert_figures(pixelsim.run(source=str(data), root=root, dataset="local").report, figures)
