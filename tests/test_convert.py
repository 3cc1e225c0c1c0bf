"""Convert's shard building: the shared process pool must give exactly what one process gives."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import TINY, TINY_FIGURES, plain_pipeline
from pixelsim.storage.root import Root
from pixelsim.storage.shards import Member, ShardMeta, build_shard, iter_arrays
from pixelsim.tasks import convert, pool
from pixelsim.tasks.convert import tree_entries


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("convert") / "root")
    out = plain_pipeline(root)
    return root, out.outputs.tree


def entries(root: str, tree, n: int = 60) -> list[Member]:
    """The first n PNGs as shard members, labelled 0, 1, 0, 1..."""
    found = sorted(e for e in tree_entries(tree).items() if e[0].endswith(".png"))[:n]
    return [Member(p, i % 2, sha, size, off) for i, (p, (off, size, sha)) in enumerate(found)]


def table(files: list[Member]) -> pa.Table:
    """Shard members as the rows build_shard takes (a plan file's columns)."""
    return pa.table({c: [getattr(m, c) for m in files] for c in Member._fields})


def test_pool_builds_exactly_what_one_process_builds(tiny, monkeypatch):
    root, tree = tiny
    files = entries(root, tree)
    for i in (7, 30):  # PNG bytes under a JPEG name: unreadable images
        files[i] = files[i]._replace(path=files[i].path[:-4] + ".jpg")
    meta = ShardMeta(shape=(28, 28), classes=["a", "b"], split="train", source_sha256="")
    blob = f"{tree.dir}/members.bin"
    here = build_shard(root, blob, table(files), "out/here.parquet", meta, skip_bad=True)
    monkeypatch.setenv(pool.ENV, "2")
    try:
        spread = pool.pool().submit(build_shard, root, blob, table(files), "out/spread.parquet", meta, skip_bad=True).result()
        refused = pool.pool().submit(build_shard, root, blob, table(files), "out/refused.parquet", meta).result()
    finally:
        pool.shutdown()
    assert here == spread and here["rows"] == 58 and here["counts"] == [29, 29]
    assert [e.split(":")[0] for e in here["errors"]] == [files[7].path, files[30].path]
    assert all("content is PNG but extension says JPEG" in e for e in here["errors"])
    assert refused == {"errors": here["errors"]} and not (Path(root) / "out/refused.parquet").exists()
    (batch,) = iter_arrays(Root(root), ["out/spread.parquet"], ("path", "label_index", "image"))
    assert batch["path"] == [f.path for i, f in enumerate(files) if i not in (7, 30)]
    assert batch["image"].shape == (58, 784)


def test_a_run_through_the_pool_writes_the_same_shards(tmp_path, monkeypatch):
    plain = plain_pipeline(str(tmp_path / "plain"))
    monkeypatch.setenv(pool.ENV, "2")
    monkeypatch.setattr(convert, "POOL_MIN_IMAGES", 1)
    try:
        pooled = plain_pipeline(str(tmp_path / "pooled"))
    finally:
        pool.shutdown()
    assert pooled.outputs.shards.sha256.keys() == plain.outputs.shards.sha256.keys()
    for k, v in plain.outputs.shards.sha256.items():
        assert pooled.outputs.shards.sha256[k] == v, k  # byte-identical Parquet files
    assert pooled.report["metrics"] == plain.report["metrics"]


def test_pool_size_rules(monkeypatch):
    monkeypatch.setenv(pool.ENV, "0")
    assert pool.workers() == 0 and pool.pool() is None
    monkeypatch.setenv(pool.ENV, "3")
    assert pool.workers() == 3
    monkeypatch.delenv(pool.ENV)
    # a script read from stdin cannot be re-imported by pool workers: decode in place
    code = "from pixelsim.tasks import pool; print(pool.workers())"
    out = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, check=True,
                         cwd=str(TINY.parent.parent.parent))
    assert out.stdout.strip() == "0"


SCRIPT = """
import json, sys
import pixelsim
from pixelsim.tasks import convert, pool
convert.POOL_MIN_IMAGES = 1   # the pool even for the tiny archive
{body}
"""
RUN = ("result = pixelsim.run(dataset='tiny', source=sys.argv[1], root=sys.argv[2], shard_size=300)\n"
       "print(json.dumps([pool.workers(), result.report['metrics']['l1']['balanced']]))")


@pytest.mark.parametrize("guarded", [False, True])
def test_a_script_without_a_main_guard_runs_on_one_core_instead_of_hanging(tmp_path, guarded):
    """Pool workers import the main script; one that calls pixelsim at its top level would start
    the run again in each worker, which then waits forever for its parent's locks."""
    body = ("if __name__ == '__main__':\n" + "\n".join("    " + line for line in RUN.splitlines())) if guarded else RUN
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(body=body))
    env = {**os.environ, pool.ENV: "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run([sys.executable, str(script), str(TINY), str(tmp_path / "root")], capture_output=True,
                         text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2 if guarded else 0, TINY_FIGURES["l1"]["balanced"]]
    warned = f"decoding on one core: {script} calls pixelsim outside an `if __name__ == \"__main__\":` block"
    assert (warned in out.stderr) != guarded, out.stderr


def test_a_step_started_while_a_worker_imports_the_main_script_is_refused(tmp_path, monkeypatch):
    import multiprocessing

    from pixelsim.storage.cache import reuse_or_build
    from pixelsim.storage.errors import PixelsimError
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(PixelsimError, match="put the script's pixelsim calls under `if __name__ == \"__main__\":`"):
        reuse_or_build(Root(str(tmp_path)), "x", lambda: 1, lambda: 1)


def test_a_dead_worker_is_a_transient_error_and_the_next_try_gets_a_new_pool(tiny, monkeypatch):
    import os

    from pixelsim.storage.errors import TransientError
    import pyarrow as pa

    from pixelsim.storage.shards import PlanWriter, rows_digest
    from pixelsim.tasks.contracts import ShardJob
    from pixelsim.tasks.convert import convert_shard, write_plan
    root, tree = tiny
    files = entries(root, tree, 20)
    rows = pa.Table.from_pylist([m._asdict() for m in files])
    plan = PlanWriter()
    plan.add("train-0.parquet", rows)
    write_plan(Root(root), "s/_plan/members.parquet", plan.finish())
    job = ShardJob(root=root, dir="s", name="convert-train-00000", split="train", folder="train",
                   file="s/train-0.parquet", plan="s/_plan/members.parquet", group=0, digest=rows_digest(rows),
                   blob=f"{tree.dir}/members.bin",
                   shape=(28, 28), classes=("a", "b"), archive_sha256=tree.archive_sha256, parallel=True)
    monkeypatch.setenv(pool.ENV, "2")
    try:
        broken = pool.pool()
        with pytest.raises(Exception):
            broken.submit(os._exit, 3).result()  # a worker dies, as under the OOM killer
        with pytest.raises(TransientError, match="convert-train-00000: a shard-building worker process died"):
            convert_shard(job)
        assert pool.pool() is not broken
        out = convert_shard(job)  # the retry
    finally:
        pool.shutdown()
    assert not out.cached and out.value.rows == 20 and out.value.counts == {"a": 10, "b": 10}


def test_a_jpeg_dataset_of_mixed_sizes_resizes_fast_by_default_and_exactly_on_request(tmp_path):
    """--resize decodes large JPEGs at a reduced scale (its own cache key); --exact-resize gives
    the pixels of a full decode + bilinear resize; both classify the same way here."""
    import io

    from PIL import Image

    import numpy as np

    import pixelsim

    rng = np.random.default_rng(5)
    folder, originals = tmp_path / "photos", {}
    for split, n in (("train", 12), ("valid", 6)):
        for c, tint in (("dark", 60), ("light", 190)):
            (folder / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(120, 400)), int(rng.integers(120, 400))
                small = np.clip(rng.normal(tint, 40, (h // 16, w // 16, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(buf, format="JPEG")
                (folder / split / c / f"{i:02d}.jpg").write_bytes(buf.getvalue())
                originals[f"{split}/{c}/{i:02d}.jpg"] = buf.getvalue()
    root = str(tmp_path / "root")
    fast = pixelsim.run(source=str(folder), dataset="photos", root=root, resize=[28, 28])
    exact = pixelsim.run(source=str(folder), dataset="photos", root=root, resize=[28, 28], exact_resize=True)
    assert fast.outputs.shards.dir != exact.outputs.shards.dir      # other pixels, another folder
    assert exact.cached["untar"] and not exact.cached["convert"]
    store = pixelsim.open(root)
    fx, fl, _ = store.run(fast.run_id).load_split("train")
    ex, el, classes = store.run(exact.run_id).load_split("train")
    assert classes == ["dark", "light"] and np.array_equal(fl, el) and fx.shape == ex.shape == (24, 28, 28)
    paths = [f"train/{classes[label]}/{i:02d}.jpg" for label in (0, 1) for i in range(12)]
    want = np.stack([np.asarray(Image.open(io.BytesIO(originals[p])).convert("L").resize(
        (28, 28), Image.Resampling.BILINEAR)) for p in paths])
    assert np.array_equal(ex, want)
    diff = np.abs(fx.astype(int) - ex.astype(int))
    assert 0 < diff.mean() < 4, diff.mean()
    assert fast.report["metrics"]["l1"]["per_class"] == exact.report["metrics"]["l1"]["per_class"] == \
        {"dark": 1.0, "light": 1.0}


def test_skip_bad_never_leaves_a_class_without_training_images(tmp_path):
    """--skip-bad may leave out bad files, but a class whose every training image is bad has no
    template: the run fails naming it instead of reporting figures without it."""
    import numpy as np

    import pixelsim
    from pixelsim.storage.images import encode_png
    from pixelsim.tasks.convert import BadImages

    rng = np.random.default_rng(3)
    for split in ("train", "valid"):
        for c in ("a", "b"):
            (tmp_path / "src" / split / c).mkdir(parents=True)
            for i in range(4):
                bad = split == "train" and c == "b"
                data = b"\x89PNG\r\n\x1a\nnot really" if bad else encode_png(rng.integers(0, 256, (8, 8), np.uint8))
                (tmp_path / "src" / split / c / f"{i}.png").write_bytes(data)
    with pytest.raises(BadImages) as e:
        pixelsim.run(source=str(tmp_path / "src"), dataset="onebad", root=str(tmp_path / "root"), skip_bad=10)
    assert "class b: no training image is left" in str(e.value) and "src/train/b/0.png" in str(e.value)


def test_a_member_whose_bytes_changed_is_a_damaged_cache_never_a_skipped_image(tiny):
    """--skip-bad must not silently drop an image because the cached unpacking was damaged."""
    from pixelsim.storage.errors import MemberChanged

    root, tree = tiny
    files = entries(root, tree, 4)
    files[1] = files[1]._replace(sha256="0" * 64)
    meta = ShardMeta(shape=(28, 28), classes=["a", "b"], split="train", source_sha256="")
    with pytest.raises(MemberChanged, match=f"{files[1].path}: its bytes in the unpacked archive changed"):
        build_shard(root, f"{tree.dir}/members.bin", table(files), "out/x.parquet", meta, skip_bad=True)
