"""Incremental conversion: a grown archive decodes only its new images, and its figures are those
of a run from scratch."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import grow, plain_pipeline
from pixelsim.storage import shards as shard_store
from pixelsim.tasks.convert import Earlier, assign


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Every member path that convert decodes in this process."""
    seen: list[str] = []
    real = shard_store.decode_members

    def counting(items, **kw):
        seen.extend(p for p, _, _ in items)
        return real(items, **kw)

    monkeypatch.setattr(shard_store, "decode_members", counting)
    return seen


def templates_of(out) -> np.ndarray:
    t = out.outputs.templates
    table = pq.read_table(Path(t.root) / t.dir / "templates.parquet")
    return np.stack(table.column("template").to_numpy(zero_copy_only=False))


def test_a_grown_archive_decodes_only_its_new_images_and_equals_a_run_from_scratch(folder, tmp_path, decoded):
    root = str(tmp_path / "root")
    first = plain_pipeline(root, folder, shard_size=100)
    assert len(decoded) == 1400
    decoded.clear()
    added = grow(folder, 7)
    grown = plain_pipeline(root, folder, shard_size=100)
    assert sorted(decoded) == added                       # 14 of 1,414 images decoded again
    assert grown.outputs.shards.reused == {"from": first.outputs.shards.dir, "shards": 14, "images": 1400}
    assert not grown.cached["convert"]
    scratch = plain_pipeline(str(tmp_path / "scratch"), folder, shard_size=100)
    assert grown.report["metrics"] == scratch.report["metrics"]
    assert grown.outputs.shards.counts == scratch.outputs.shards.counts
    assert np.array_equal(templates_of(grown), templates_of(scratch))
    decoded.clear()
    again = plain_pipeline(root, folder, shard_size=100)   # the grown set plans its own shards again
    assert all(again.cached.values()) and decoded == []


def test_a_changed_image_re_decodes_only_its_earlier_shard(folder, tmp_path, decoded):
    root = str(tmp_path / "root")
    plain_pipeline(root, folder, shard_size=100)
    changed = sorted((folder / "train" / "7").glob("*.png"))[0]
    shutil.copy(sorted((folder / "train" / "3").glob("*.png"))[0], changed)   # same path, other bytes
    decoded.clear()
    out = plain_pipeline(root, folder, shard_size=100)
    assert str(changed.relative_to(folder.parent)) in decoded and len(decoded) == 100
    assert out.outputs.shards.reused["shards"] == 13
    scratch = plain_pipeline(str(tmp_path / "scratch"), folder, shard_size=100)
    assert out.report["metrics"] == scratch.report["metrics"]


def test_a_damaged_earlier_shard_is_decoded_again_not_copied(folder, tmp_path, decoded, caplog):
    root = str(tmp_path / "root")
    first = plain_pipeline(root, folder, shard_size=100)
    victim = Path(root) / first.outputs.shards.shards["train"][0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    grow(folder, 1)
    decoded.clear()
    out = plain_pipeline(root, folder, shard_size=100)
    assert len(decoded) == 100 + 2 and out.outputs.shards.reused["shards"] == 13
    assert "is gone or altered; decoding its images again" in caplog.text
    scratch = plain_pipeline(str(tmp_path / "scratch"), folder, shard_size=100)
    assert out.report["metrics"] == scratch.report["metrics"]


def test_other_pixel_options_never_share_shards(folder, tmp_path, decoded):
    root = str(tmp_path / "root")
    plain_pipeline(root, folder, shard_size=100)
    decoded.clear()
    out = plain_pipeline(root, folder, shard_size=100, resize=(14, 14))
    assert len(decoded) == 1400 and out.outputs.shards.reused == {}


def rows(paths: list[str], sha: str = "s") -> pa.Table:
    n = len(paths)
    return pa.table({"path": paths, "label": [0] * n, "sha256": [sha] * n, "size": [1] * n, "offset": [0] * n})


def earlier(parts: dict[str, list[str]]) -> Earlier:
    names = [n for n, ps in parts.items() for _ in ps]
    table = pa.table({"part": names, "path": [p for ps in parts.values() for p in ps],
                      "sha256": ["s"] * len(names)})
    return Earlier("shards/d/old", table, {n: {"file": n, "sha256": "x", "bytes": 1, "rows": len(ps)}
                                           for n, ps in parts.items()})


def test_assign_reuses_whole_intact_shards_and_cuts_the_rest_in_order():
    t0, t1, t2 = (f"train-0000{i}-of-00003.parquet" for i in range(3))
    old = earlier({t0: ["a", "b", "c", "d"], t1: ["e", "f", "g", "h"], t2: ["i"]})
    cut = assign(rows(list("abcdefghijk")), "train", old, 5)
    assert [(s and s["file"], t.column("path").to_pylist()) for s, t in cut] == [
        (f"shards/d/old/{t0}", list("abcd")), (f"shards/d/old/{t1}", list("efgh")),
        (None, list("ijk"))]                      # the 1-image tail is folded into the new shard
    gone = assign(rows(list("abcefghx")), "train", old, 5)          # d removed: its shard is cut again
    assert [(s and s["file"], t.column("path").to_pylist()) for s, t in gone] == [
        (f"shards/d/old/{t1}", list("efgh")), (None, list("abcx"))]
    other = assign(rows(list("abcd"), sha="t"), "train", old, 4)    # same paths, other bytes
    assert [s for s, _ in other] == [None]
    assert [s for s, _ in assign(rows(list("abcd")), "valid", old, 4)] == [None]   # another split's shards
    assert [s for s, _ in assign(rows(list("abcdefgh")), "train", old, 3)] == [None] * 3   # too big for --shard-size 3
    hostile = earlier({"train-../../x.parquet": list("abcd")})   # a manifest's name is never taken as a path
    assert [s for s, _ in assign(rows(list("abcd")), "train", hostile, 4)] == [None]


def test_a_damaged_plan_file_is_rewritten_and_no_shard_is_decoded_again(folder, tmp_path, decoded):
    root = str(tmp_path / "root")
    first = plain_pipeline(root, folder, shard_size=100)
    plan = Path(root) / first.outputs.shards.dir / "_plan" / "members.parquet"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    decoded.clear()
    again = plain_pipeline(root, folder, shard_size=100)
    assert decoded == [] and again.report == first.report and again.cached["convert"]
    assert plan.read_bytes() != bytes(data)


def test_a_job_never_takes_rows_other_than_those_it_was_planned_with(tmp_path):
    from pixelsim.storage.errors import IntegrityError
    from pixelsim.storage.root import Root
    from pixelsim.storage.shards import PlanWriter, plan_rows, rows_digest
    from pixelsim.tasks.convert import write_plan
    r = Root(str(tmp_path))
    a, b = rows(list("ab")), rows(list("cd"))
    plan = PlanWriter()
    plan.add("train-0", a)
    plan.add("train-1", b)
    write_plan(r, "p.parquet", plan.finish())
    assert plan_rows(r, "p.parquet", 1, rows_digest(b)).column("path").to_pylist() == ["c", "d"]
    with pytest.raises(IntegrityError, match="row group 0 is not the shard it was planned as"):
        plan_rows(r, "p.parquet", 0, rows_digest(b))
