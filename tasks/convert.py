"""Step 3: decode every image of the train and valid splits into Parquet shards.

Planned once, then one task per shard (`convert-train-00003`), so shards convert in
parallel on any task runner, cache one by one, and a lost shard is rebuilt alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from collections import Counter
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pyarrow as pa

from pixelsim.storage import catalog
from pixelsim.storage.archive import BLOB, INDEX, read_index
from pixelsim.storage.cache import Outcome, load_part, record_part, reuse_or_build
from pixelsim.storage.errors import ImageError, LayoutError, TransientError
from pixelsim.storage.images import decode_members, peek_size
from pixelsim.storage.layout import Layout, split_rows
from pixelsim.storage.root import MANIFEST, Root, part_of, publish_parts
from pixelsim.storage.shards import Member, ShardMeta, build_shard, member_bytes
from pixelsim.tasks import pool
from pixelsim.tasks.contracts import Options, Part, ShardJob, ShardPlan, ShardSet, Tree

VERSION = "6"   # 6: JPEG reduced-scale decode with --resize, 16-bit colour rounded
SPLITS = ("train", "valid")
MAX_LISTED = 20
# Below this many files a process pool's start (about 0.3 s) costs more than its cores save.
POOL_MIN_IMAGES = 50_000
SIZE_SAMPLE = 101   # training files whose headers decide the common image size


def tree_index(tree: Tree) -> tuple[pa.Table, list[str]]:
    """The unpacked members' index (path, offset, size, sha256, in archive order) and the
    archive's folders (an empty class folder has no file to show it)."""
    root = Root(tree.root)
    manifest = root.read_json(posixpath.join(tree.dir, MANIFEST))
    return read_index(root.read_bytes(posixpath.join(tree.dir, INDEX))), manifest.get("dirs", [])


def tree_entries(tree: Tree) -> dict[str, tuple[int, int, str]]:
    """{path inside the archive: (offset, size, sha256)} of the unpacked members."""
    index = tree_index(tree)[0]
    cols = [index.column(c).to_pylist() for c in ("path", "offset", "size", "sha256")]
    return {p: (o, n, h) for p, o, n, h in zip(*cols)}


def read_members(tree: Tree, files: list[Member]) -> list[bytes]:
    """These members' bytes from this unpacked archive's members blob."""
    return member_bytes(Root(tree.root), posixpath.join(tree.dir, BLOB), files)


def common_size(tree: Tree, picked: list[Member]) -> tuple[int, int]:
    """The most common image size among these (evenly spread) training files, so that one odd
    file, even the first, is the one reported as mis-sized."""
    sizes = Counter(peek_size(data) for data in read_members(tree, picked))
    sizes.pop(None, None)
    if not sizes:
        first = picked[0]
        return read_image(read_members(tree, [first])[0], first, channels=1, size=None, resize=False).shape[:2]
    return max(sizes.items(), key=lambda kv: kv[1])[0]


def read_image(data: bytes, member: Member, *, channels: int, size: tuple[int, int] | None,
               resize: bool) -> np.ndarray:
    """Decode one member, checking its bytes against the unpacking index first."""
    images, _, errors = decode_members([(member.path, member.sha256, data)], channels=channels, size=size,
                                       resize=resize)
    if errors:
        raise ImageError(errors[0])
    return images[0]


def plan_shards(tree: Tree, layout: Layout, dataset: str, options: Options,
                index: pa.Table | None = None) -> ShardPlan:
    """Split both splits' files into shards; fix the image shape from the training images.

    Each job lists its members with their digests, and its file name follows from the folder's
    key (the tree's digest, the layout and the options that shape pixels), so a shard is reused
    exactly when its own inputs are unchanged. `index` is `tree_index`'s table when already
    read. Selection and order are Arrow work; only one shard's rows at a time become Python
    objects (its job's JSON).
    """
    index = index if index is not None else tree_index(tree)[0]
    o = options
    key = catalog.step_key("convert", VERSION, tree.digest, layout.to_dict(), o.shard_size, o.channels,
                           list(o.resize) if o.resize else None, *(["exact"] if o.resize and o.exact_resize else []))
    rel = catalog.shards_dir(dataset, key)
    splits = []
    for role, folder in zip(SPLITS, (layout.train, layout.valid)):
        rows = split_rows(index, layout, folder).select(list(Member._fields))
        if not len(rows):
            raise LayoutError(f"split {folder}/ holds no images of classes {', '.join(layout.classes)}")
        splits.append((role, folder, rows))
    if o.resize:
        shape = tuple(o.resize)
    else:
        train = splits[0][2]
        step = max(1, len(train) // SIZE_SAMPLE)
        picked = train.take(pa.array(range(0, len(train), step), pa.int64())).slice(0, SIZE_SAMPLE)
        shape = tuple(common_size(tree, [Member(**r) for r in picked.to_pylist()]))
    shape += (3,) if o.channels == 3 else ()
    parallel = len(index) >= POOL_MIN_IMAGES
    jobs = []
    for role, folder, rows in splits:
        n = math.ceil(len(rows) / o.shard_size)
        for i in range(n):
            chunk = rows.slice(i * o.shard_size, o.shard_size)
            jobs.append(ShardJob(root=tree.root, dir=rel, name=f"convert-{role}-{i:05d}", split=role, folder=folder,
                                 file=catalog.shard_file(rel, role, i, n), members=pack_rows(chunk),
                                 blob=posixpath.join(tree.dir, BLOB), shape=shape, classes=tuple(layout.classes),
                                 archive_sha256=tree.archive_sha256, channels=o.channels, resize=bool(o.resize),
                                 draft=bool(o.resize) and not o.exact_resize,
                                 skip_bad=o.skip_bad > 0, parallel=parallel))
    return ShardPlan(dir=rel, classes=tuple(layout.classes), shape=shape, jobs=tuple(jobs))


def pack_rows(rows: pa.Table) -> str:
    """A shard's members (rows of Member's columns) as one JSON string of rows (see ShardJob)."""
    return json.dumps(list(zip(*(rows.column(c).to_pylist() for c in Member._fields))), separators=(",", ":"))




def convert_shard(job: ShardJob, refresh: bool = False) -> Outcome[Part]:
    """Decode one shard's files and publish its Parquet file as a part of its folder, on the
    shared process pool when the dataset is large enough to pay for it.

    Every bad file is listed; with `skip_bad` they are left out (never zero-filled) and
    returned, so the run can be held to its --skip-bad budget.
    """
    r = Root(job.root)

    def build() -> Part:
        meta = ShardMeta(shape=tuple(job.shape), classes=list(job.classes), split=job.folder,
                         source_sha256=job.archive_sha256)
        args = (job.root, job.blob, job.entries(), part_of(job.file), meta)
        kw = {"channels": job.channels, "resize": job.resize, "draft": job.draft, "skip_bad": job.skip_bad}
        ex = pool.pool() if job.parallel else None
        try:
            out = ex.submit(build_shard, *args, **kw).result() if ex else build_shard(*args, **kw)
        except BrokenProcessPool as e:  # a worker died (OOM killer, signal): the task retries on a new pool
            pool.discard(ex)
            raise TransientError(f"{job.name}: a shard-building worker process died ({e})") from e
        if out["errors"] and not job.skip_bad:
            raise BadImages(out["errors"])
        part = Part(file=job.file, sha256=out["sha256"], bytes=out["bytes"], split=job.split, rows=out["rows"],
                    counts=dict(zip(job.classes, out["counts"])), skipped=tuple(out["errors"]))
        record_part(r, job.file, part.to_dict())
        return part

    return reuse_or_build(r, job.file, lambda: Part.from_dict(load_part(r, job.file)), build, refresh=refresh)


class BadImages(ImageError):
    """Every unreadable or mis-sized file of a shard (or of a whole run, once merged)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        listed = "\n  ".join(self.errors[:MAX_LISTED])
        more = f"\n  ... and {len(self.errors) - MAX_LISTED} more" if len(self.errors) > MAX_LISTED else ""
        super().__init__(f"{len(self.errors)} bad image file(s):\n  {listed}{more}")

    def __reduce__(self):  # keep the list when crossing a process boundary
        return (BadImages, (self.errors,))


def finish_shards(plan: ShardPlan, parts: list[Part], dataset: str, root: str, skip_bad: int = 0) -> ShardSet:
    """Hold the run to its bad-file budget, publish the shard folder's manifest (last) and
    describe the whole set."""
    skipped = [e for x in parts for e in x.skipped]
    if len(skipped) > skip_bad:
        raise BadImages(skipped)
    counts = {s: {c: sum(x.counts[c] for x in parts if x.split == s) for c in plan.classes} for s in SPLITS}
    if empty := [c for c in plan.classes if counts["train"][c] == 0]:
        raise BadImages([f"class {c}: no training image is left after --skip-bad left out unreadable ones, so it "
                         f"has no template (fix or remove its bad files, or leave the class out with --classes)"
                         for c in empty] + skipped)
    out = ShardSet(root=root, dir=plan.dir, digest="", dataset=dataset, classes=list(plan.classes),
                   shape=list(plan.shape), counts=counts,
                   shards={s: [x.file for x in parts if x.split == s] for s in SPLITS},
                   sha256={x.file: x.sha256 for x in parts}, skipped=skipped,
                   parts={posixpath.basename(x.file): x.to_dict() for x in parts})
    digest = publish_parts(Root(root), plan.dir, [x.to_dict() for x in parts], record=out.record(),
                           rows={posixpath.basename(x.file): x.rows for x in parts})
    return dataclasses.replace(out, digest=digest)
