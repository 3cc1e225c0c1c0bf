"""Convert's shard building: the shared process pool must give exactly what one process gives."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, plain_pipeline
from storage.root import Root
from storage.shards import ShardMeta, build_shard, iter_arrays
from tasks import convert, pool
from tasks.convert import tree_entries


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("convert") / "root")
    out = plain_pipeline(root)
    return root, out["tree"]


def entries(root: str, tree: dict, n: int = 60) -> list[list]:
    """Plan entries [path, label, sha256, size, offset] of the first n PNGs."""
    found = sorted(e for e in tree_entries(Root(root), tree).items() if e[0].endswith(".png"))[:n]
    return [[p, i % 2, sha, size, off] for i, (p, (off, size, sha)) in enumerate(found)]


def test_pool_builds_exactly_what_one_process_builds(tiny, monkeypatch):
    root, tree = tiny
    files = entries(root, tree)
    files[7][2] = files[30][2] = "0" * 64  # bytes that no longer match their digest
    meta = ShardMeta(shape=(28, 28), classes=["a", "b"], split="train", source_sha256="")
    blob = f"{tree['dir']}/members.bin"
    here = build_shard(root, blob, files, "out/here.parquet", meta, skip_bad=True)
    monkeypatch.setenv(pool.ENV, "2")
    try:
        spread = pool.pool().submit(build_shard, root, blob, files, "out/spread.parquet", meta, skip_bad=True).result()
        refused = pool.pool().submit(build_shard, root, blob, files, "out/refused.parquet", meta).result()
    finally:
        pool.shutdown()
    assert here == spread and here["rows"] == 58 and here["counts"] == [29, 29]
    assert [e.split(":")[0] for e in here["errors"]] == [files[7][0], files[30][0]]
    assert all("changed since extraction" in e for e in here["errors"])
    assert refused == {"errors": here["errors"]} and not (Path(root) / "out/refused.parquet").exists()
    (batch,) = iter_arrays(Root(root), ["out/spread.parquet"], ("path", "label_index", "image"))
    assert batch["path"] == [f[0] for i, f in enumerate(files) if i not in (7, 30)]
    assert batch["image"].shape == (58, 784)


def test_a_run_through_the_pool_writes_the_same_shards(tmp_path, monkeypatch):
    plain = plain_pipeline(str(tmp_path / "plain"))
    monkeypatch.setenv(pool.ENV, "2")
    monkeypatch.setattr(convert, "POOL_MIN_IMAGES", 1)
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


def test_a_dead_worker_is_a_transient_error_and_the_next_try_gets_a_new_pool(tiny, monkeypatch):
    import os

    from storage.errors import TransientError
    from tasks.convert import convert_shard, pack_entries
    root, tree = tiny
    files = entries(root, tree, 20)
    plan = {"name": "convert-train-00000", "split": "train", "folder": "train", "file": "s/train-0.parquet",
            "files": pack_entries(files), "parallel": True}
    monkeypatch.setenv(pool.ENV, "2")
    try:
        broken = pool.pool()
        with pytest.raises(Exception):
            broken.submit(os._exit, 3).result()  # a worker dies, as under the OOM killer
        with pytest.raises(TransientError, match="convert-train-00000: a shard-building worker process died"):
            convert_shard(plan, tree, ["a", "b"], [28, 28], root)
        assert pool.pool() is not broken
        out = convert_shard(plan, tree, ["a", "b"], [28, 28], root)  # the retry
    finally:
        pool.shutdown()
    assert out["rows"] == 20 and out["counts"] == {"a": 10, "b": 10}
