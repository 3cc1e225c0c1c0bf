"""Convert's decoding: the shared process pool must give exactly what in-process decoding gives."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, plain_pipeline
from storage.root import Root
from tasks import convert, pool
from tasks.convert import decode_all, read_members, tree_entries


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("convert") / "root")
    out = plain_pipeline(root)
    return root, out["tree"]


def members(root: str, tree: dict, n: int = 60) -> list[tuple[str, str, bytes]]:
    entries = sorted(e for e in tree_entries(Root(root), tree).items() if e[0].endswith(".png"))[:n]
    files = [[p, 0, sha, size, off] for p, (off, size, sha) in entries]
    return [(f[0], f[2], d) for f, d in zip(files, read_members(Root(root), tree, files))]


def test_pool_decodes_exactly_what_one_process_decodes(tiny, monkeypatch):
    root, tree = tiny
    items = members(root, tree)
    items[7] = (items[7][0], items[7][1], items[7][2][:-9] + b"\0" * 9)  # altered after unpacking
    items[30] = (items[30][0], "0" * 64, items[30][2])                   # digest mismatch
    monkeypatch.setenv(pool.ENV, "2")
    monkeypatch.setattr(convert, "MIN_BATCH", 7)
    try:
        here = decode_all(items, channels=1, size=(28, 28), resize=False, parallel=False)
        spread = decode_all(items, channels=1, size=(28, 28), resize=False, parallel=True)
        assert pool._pool is not None  # the pool really ran
    finally:
        pool.shutdown()
    assert here[0].shape == (58, 28, 28) and here[0].dtype == np.uint8
    assert np.array_equal(here[0], spread[0])
    assert here[1] == spread[1] == [i for i in range(60) if i not in (7, 30)]
    assert here[2] == spread[2] and len(here[2]) == 2
    assert all("changed since extraction" in e for e in here[2])
    assert items[7][0] in here[2][0] and items[30][0] in here[2][1]


def test_a_run_through_the_pool_writes_the_same_shards(tmp_path, monkeypatch):
    plain = plain_pipeline(str(tmp_path / "plain"))
    monkeypatch.setenv(pool.ENV, "2")
    monkeypatch.setattr(convert, "POOL_MIN_IMAGES", 1)
    monkeypatch.setattr(convert, "MIN_BATCH", 50)
    try:
        pooled = plain_pipeline(str(tmp_path / "pooled"))
    finally:
        pool.shutdown()
    assert pooled["shards"]["sha256"].keys() == plain["shards"]["sha256"].keys()
    for k, v in plain["shards"]["sha256"].items():
        assert pooled["shards"]["sha256"][k] == v, k  # byte-identical Parquet files
    assert pooled["report"]["report"]["metrics"] == plain["report"]["report"]["metrics"]


def test_pool_size_rules(monkeypatch):
    monkeypatch.setenv(pool.ENV, "0")
    assert pool.workers() == 0 and pool.pool() is None
    monkeypatch.setenv(pool.ENV, "3")
    assert pool.workers() == 3
    monkeypatch.delenv(pool.ENV)
    # a script read from stdin cannot be re-imported by pool workers: decode in place
    code = "import sys; sys.path.insert(0, '.'); from tasks import pool; print(pool.workers())"
    out = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, check=True,
                         cwd=str(TINY.parent.parent.parent))
    assert out.stdout.strip() == "0"
