"""No network when nothing needs it: a named dataset whose archive is in the root is not asked
for again, and --offline never touches the network."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest

import pixelsim
from conftest import TINY, TINY_FIGURES, assert_figures
from pixelsim.flows import datasets, pipeline

TINY_BYTES = TINY.read_bytes()


@pytest.fixture
def official(serve, monkeypatch):
    """mnist_tiny as a named dataset whose official URL is a loopback server that counts requests,
    pinned the way fastai pins (size and md5 of the first MiB), with no bundled copy."""
    import http.server

    seen = []
    base = serve({"mnist_tiny.tgz": TINY})
    url = f"{base}/mnist_tiny.tgz"
    handler = http.server.SimpleHTTPRequestHandler
    original = handler.send_head

    def counting(self):
        seen.append((self.command, self.path))
        return original(self)

    monkeypatch.setattr(handler, "send_head", counting)
    ds = dataclasses.replace(datasets.DATASETS["mnist_tiny"], url=url, bundled=None, bundled_pins={},
                             pins={"size": len(TINY_BYTES), "md5_head": hashlib.md5(TINY_BYTES[:1 << 20]).hexdigest()})
    monkeypatch.setitem(pipeline.DATASETS, "mnist_tiny", ds)
    monkeypatch.delenv("PIXELSIM_URL_MNIST_TINY", raising=False)
    return url, seen


def test_an_archive_in_the_root_is_not_asked_for_again(official, tmp_path):
    url, seen = official
    root = str(tmp_path / "root")
    first = pixelsim.run("mnist_tiny", root=root, shard_size=300)
    assert_figures(first.report, TINY_FIGURES) and first.report["source"]["url"] == url
    assert seen == [("GET", "/mnist_tiny.tgz")]          # no HEAD: the pins name the archive
    again = pixelsim.run("mnist_tiny", root=root, shard_size=300)
    assert again.cached["download"] and again.report == first.report
    assert len(seen) == 1                                  # the second run asked nothing
    offline = pixelsim.run("mnist_tiny", root=root, shard_size=300, offline=True)
    assert offline.report == first.report and len(seen) == 1
    pixelsim.run("mnist_tiny", root=root, shard_size=300, refresh=True)   # asked for: fetched again
    assert len(seen) == 2


def test_offline_never_asks_the_network_even_for_a_damaged_copy_or_refresh(official, tmp_path):
    url, seen = official
    root = tmp_path / "root"
    first = pixelsim.run("mnist_tiny", root=str(root), shard_size=300)
    assert len(seen) == 1
    again = pixelsim.run("mnist_tiny", root=str(root), shard_size=300, offline=True, refresh=True)
    assert_figures(again.report, TINY_FIGURES) and len(seen) == 1   # verified, not fetched
    archive, = root.glob("archives/*/mnist_tiny.tgz")
    archive.write_bytes(archive.read_bytes()[:-10] + bytes(10))   # damaged in place
    with pytest.raises(pixelsim.PixelsimError, match=r"--offline: the copy in .*archives/.* is missing or damaged"):
        pixelsim.run("mnist_tiny", root=str(root), shard_size=300, offline=True)
    assert len(seen) == 1
    healed = pixelsim.run("mnist_tiny", root=str(root), shard_size=300)   # online again: fetched once more
    assert_figures(healed.report, TINY_FIGURES) and len(seen) == 2
    # the same for a --source URL pinned by --sha256
    pinned = dict(source=url, root=str(root), shard_size=300, sha256=first.report["source"]["sha256"])
    pixelsim.run(**pinned)
    assert len(seen) == 3
    copy, = (a for a in root.glob("archives/*/mnist_tiny.tgz") if a.parent.name != archive.parent.name)
    copy.write_bytes(b"damaged")
    with pytest.raises(pixelsim.PixelsimError, match=r"--offline: the copy in .*archives/.* is missing or damaged"):
        pixelsim.run(**pinned, offline=True)
    assert len(seen) == 3


def test_offline_names_the_step_that_would_need_the_network(official, tmp_path, monkeypatch):
    url, seen = official
    with pytest.raises(pixelsim.PixelsimError, match=rf"--offline: dataset mnist_tiny is not in .* yet and "
                                                     rf"downloading it needs the network \({url}\)"):
        pixelsim.run("mnist_tiny", root=str(tmp_path / "root"), offline=True)
    monkeypatch.setenv("PIXELSIM_OFFLINE", "1")
    with pytest.raises(pixelsim.PixelsimError, match=r"--offline: downloading http://.*/x.tgz needs the network"):
        pixelsim.run(source=url.replace("mnist_tiny", "x"), root=str(tmp_path / "root"))
    assert seen == []
    # a local source needs no network, offline or not
    local = pixelsim.run(source=str(TINY), root=str(tmp_path / "root"), shard_size=300)
    assert_figures(local.report, TINY_FIGURES)


def test_the_bundled_copy_in_the_root_is_used_without_asking(tmp_path, monkeypatch, serve):
    """mnist_sample's official URL unreachable once: the bundled copy fills the root; later runs
    use it without trying the official URL again (here: a server that would count the attempt)."""
    seen = []
    import http.server
    base = serve({})
    monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, "send_head",
                        lambda self: seen.append(self.path) or self.send_error(503))
    monkeypatch.setenv("PIXELSIM_URL_MNIST_SAMPLE", f"{base}/mnist_sample.tgz")
    root = str(tmp_path / "root")
    first = pixelsim.run("mnist_sample", root=root)
    assert first.report["source"]["bundled"] is True and seen
    n = len(seen)
    again = pixelsim.run("mnist_sample", root=root)
    assert again.cached == {s: True for s in again.cached} and again.report == first.report
    assert len(seen) == n
