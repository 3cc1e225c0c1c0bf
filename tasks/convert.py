"""Step 3: decode every image of the train and valid splits into Parquet shards.

Planned once, then one task per shard (`convert-train-00003`), so shards convert in
parallel on any task runner, cache one by one, and a lost shard is rebuilt alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import posixpath
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pixelsim.storage import catalog
from pixelsim.storage.archive import BLOB, INDEX, read_index
from pixelsim.storage.cache import Outcome, load_part, record_part, reuse_or_build
from pixelsim.storage.errors import ImageError, IntegrityError, LayoutError, TransientError
from pixelsim.storage.images import decode_members, peek_size
from pixelsim.storage.layout import deeper_files, find_layout, layout_paths, split_rows
from pixelsim.storage.root import Root, part_of, publish_parts, sha256_bytes
from pixelsim.storage.shards import (MEMBERS, Member, ShardMeta, build_shard, member_bytes, parse_members,
                                     PlanWriter, rows_digest)
from pixelsim.storage.tables import numbers, release
from pixelsim.tasks import pool
from pixelsim.tasks.bounds import plan_bounds
from pixelsim.tasks.contracts import Options, Part, ShardJob, ShardPlan, ShardSet, Tree

VERSION = "7"   # 7: parts know their members (incremental conversion); 6: JPEG draft decode, 16-bit rounding
SPLITS = ("train", "valid")
MAX_LISTED = 20
# Below this many files a process pool's start (about 0.3 s) costs more than its cores save.
POOL_MIN_IMAGES = 50_000
SIZE_SAMPLE = 101   # training files whose headers decide the common image size
MANY_SHARDS = 200   # beyond this many, a --shard-size under the default is worth a warning
REUSE_MIN = 4       # an earlier shard under shard_size / REUSE_MIN images is re-decoded with the new ones
log = logging.getLogger("pixelsim.convert")


def tree_index(tree: Tree, columns: list[str] | None = None) -> tuple[pa.Table, list[str]]:
    """The unpacked members' index (path, offset, size, sha256, in archive order; or only these
    `columns`) and the archive's folders (an empty class folder has no file to show it)."""
    root = Root(tree.root)
    manifest = root.manifest(tree.dir)
    with root.open(posixpath.join(tree.dir, INDEX)) as f:   # only these columns' bytes are read
        return read_index(f, columns), manifest.get("dirs", [])


def tree_entries(tree: Tree) -> dict[str, tuple[int, int, str]]:
    """{path inside the archive: (offset, size, sha256)} of the unpacked members."""
    index = tree_index(tree)[0]
    cols = [index.column(c).to_pylist() for c in ("path", "offset", "size", "sha256")]
    return {p: (o, n, h) for p, o, n, h in zip(*cols)}


def read_members(tree: Tree, files: list[Member]) -> list[bytes]:
    """These members' bytes from this unpacked archive's members blob."""
    return member_bytes(Root(tree.root), posixpath.join(tree.dir, BLOB), [f.offset for f in files], [f.size for f in files])


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


def pixels_key(classes: tuple[str, ...] | list[str], shape: tuple[int, ...], o: Options) -> str:
    """Everything besides its members that fixes a shard's rows: the decoder's version, the class
    list (labels), the image shape and the options that shape pixels. Two sets with equal keys
    may share any shard whose members (path and bytes) they both hold."""
    return catalog.step_key("convert-pixels", VERSION, list(classes), list(shape), o.channels,
                            list(o.resize) if o.resize else None, bool(o.resize) and not o.exact_resize)


@dataclass(frozen=True)
class Earlier:
    """A published shard set that a new plan may take whole shards from."""

    dir: str
    members: pa.Table             # MEMBERS: part, path, sha256
    parts: dict[str, dict]        # shard file name -> its Part record


def earlier_set(root: Root, dataset: str, pixels: str, own: str) -> Earlier | None:
    """The set to reuse shards from: this folder's own when it is published (so a rerun plans the
    same shards), else this dataset's most recently published set with the same pixels key.
    One whose members file is unreadable or fails its digest is passed over for the next."""
    found = []
    for name in root.glob(catalog.shard_manifests(dataset)):
        folder = posixpath.dirname(name)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError, IntegrityError):
            manifest = root.manifest(folder)
            entry = next((f for f in manifest["files"] if f["name"] == MEMBERS), None)
            if entry and manifest["record"].get("pixels") == pixels:
                found.append((folder == own, root.modified(name), folder, manifest, entry))
    for _, _, folder, manifest, entry in sorted(found, key=lambda f: f[:3], reverse=True):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, IntegrityError, pa.ArrowException):
            data = root.read_bytes(posixpath.join(folder, MEMBERS))
            if sha256_bytes(data) == entry["sha256"]:
                return Earlier(folder, parse_members(data), dict(manifest["record"]["parts"]))
    return None


def assign(rows: pa.Table, role: str, earlier: Earlier | None, shard_size: int,
           sha256: pa.Array | pa.ChunkedArray | None = None) -> list[tuple[dict | None, pa.Table]]:
    """Cut one split's rows into shards: first every shard of the earlier set whose members (same
    path, same sha256) are all still here, unchanged; then the other rows, in order, `shard_size`
    at a time. Returns (the earlier shard's Part record or None, its rows) per shard. The rows'
    digests are their `sha256` column, or `sha256` (one per row) when the rows leave them out.

    So a grown archive re-decodes only its new images (and those of an earlier shard that lost
    or changed a member). Only earlier shards that fit this plan's `shard_size` are taken, and
    one under 1/REUSE_MIN of it (a split's tail) is folded into the new ones, so repeated growth
    does not leave a trail of tiny shards.
    """
    def cut(t: pa.Table) -> list[tuple[dict | None, pa.Table]]:
        return [(None, t.slice(i * shard_size, shard_size)) for i in range(math.ceil(len(t) / shard_size))]

    if earlier is None:
        return cut(rows)
    # each row's earlier shard, as a code into the earlier set's part names: found by path (paths
    # are unique), kept only if the bytes are the same; integer codes, never a copy of the names
    part = earlier.members.column("part")
    part = (part if pa.types.is_dictionary(part.type) else pc.dictionary_encode(part)).unify_dictionaries().combine_chunks()
    names, codes = part.dictionary.to_pylist(), part.indices.to_numpy(zero_copy_only=False)
    at = pc.index_in(rows.column("path"), value_set=earlier.members.column("path"))
    same = pc.fill_null(pc.equal(earlier.members.column("sha256").take(at),
                                 rows.column("sha256") if sha256 is None else sha256), False).to_numpy(zero_copy_only=False)
    found = np.where(same, codes[pc.fill_null(at, 0).to_numpy(zero_copy_only=False)] if len(codes) else 0, -1)
    del at, same
    need = np.bincount(codes, minlength=len(names))
    have = np.bincount(found[found >= 0], minlength=len(names))
    keep = sorted((n, k) for k, n in enumerate(names)
                  if n.startswith(role + "-") and have[k] == need[k] and shard_size >= need[k]
                  and need[k] * REUSE_MIN >= shard_size and n in earlier.parts
                  and catalog.is_shard_name(n))   # a plain file name of the earlier folder, nothing else
    if not keep:
        return cut(rows)
    to_group = np.full(len(names) + 1, len(keep), np.int64)   # code -1 (no earlier shard) is the last
    to_group[[k for _, k in keep]] = np.arange(len(keep))
    group = to_group[found]
    del found
    order = np.argsort(group, kind="stable")   # by shard kept, rows in their order within each
    rows = rows.take(numbers(order))
    sizes = np.bincount(group, minlength=len(keep) + 1)
    keep = [n for n, _ in keep]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = [({**earlier.parts[n], "file": posixpath.join(earlier.dir, n)}, rows.slice(starts[j], sizes[j]))
           for j, n in enumerate(keep)]
    return out + cut(rows.slice(starts[-2]))


def plan_shards(tree: Tree, dataset: str, options: Options) -> ShardPlan:
    """Find the layout, split both splits' files into shards, fix the image shape from the
    training images, and from it the images per shard and the run's memory bound (tasks.bounds).

    A job names its row group of the set's plan file and the digest of its rows; its file name
    follows from the folder's key (the tree's digest, the layout and the options that shape
    pixels), and a part already built for that name is reused only if it was built from the
    same rows (`ShardJob.digest`). Shards of an earlier set with the same pixels key are reused
    whole where their members are unchanged (`assign`). Selection and order are Arrow work; no
    Python object per image is made; the cut carries paths and row numbers only (digests, sizes
    and offsets are read after it, and taken a shard at a time as the plan file is written).
    """
    o = options
    names, folders = tree_index(tree, ["path"])
    members = len(names)
    if len(names) >= POOL_MIN_IMAGES and not Root(tree.root).glob(catalog.shard_manifests(dataset)):
        pool.warm()   # a first conversion of a large archive: the workers boot while this plans
    paths = pa.table({"path": names.column("path"), "row": pa.array(np.arange(len(names), dtype=np.int64))})
    del names
    release()
    layout = find_layout(layout_paths(paths), folders=folders, train_split=o.train_split,
                         valid_split=o.valid_split, classes=list(o.classes) if o.classes else None)
    splits, notes = [], list(layout.notes)
    for role, folder in zip(SPLITS, (layout.train, layout.valid)):
        rows = split_rows(paths, layout, folder).select(["path", "label", "row"])
        if not len(rows):
            raise LayoutError(f"split {folder}/ holds no images of classes {', '.join(layout.classes)}")
        deeper, first = deeper_files(paths, layout, folder)
        counts = np.bincount(rows.column("label").to_numpy(), minlength=len(layout.classes))
        empty = [c for c, n in zip(layout.classes, counts) if n == 0]
        where = posixpath.join(layout.base, folder) if layout.base else folder
        if empty and role == "train":
            raise LayoutError(f"class {empty[0]}: {where}/{empty[0]}/ holds no image directly"
                              + (f" ({deeper} file(s) in subfolders of the class folders, e.g. {first}, are not read: "
                                 "move them up)" if deeper else "") + ", so it has no template; or leave it out with --classes")
        if deeper:
            notes.append(f"{deeper} file(s) in subfolders of {where}/<class>/ ignored (only a class folder's own "
                         f"files are read), e.g. {first}")
        if empty:
            notes.append(f"no validation image of class(es) {', '.join(empty)} in {where}/: no accuracy for them, and "
                         f"balanced is the mean over the other classes")
        splits.append((role, folder, rows))
        release()
    del paths
    release()
    index = tree_index(tree, ["sha256", "size", "offset"])[0]
    layout = dataclasses.replace(layout, notes=notes)
    if o.resize:
        shape = tuple(o.resize)
    else:
        train = splits[0][2]
        step = max(1, len(train) // SIZE_SAMPLE)
        picked = members_of(index, train.take(pa.array(range(0, len(train), step), pa.int64())).slice(0, SIZE_SAMPLE))
        shape = tuple(common_size(tree, [Member(**r) for r in picked.to_pylist()]))
    shape += (3,) if o.channels == 3 else ()
    # before any decoding: images per shard by pixel bytes too, and the run's peak memory checked
    images = sum(len(rows) for _, _, rows in splits)
    processes = pool.workers() if images >= POOL_MIN_IMAGES else 1
    per_shard = plan_bounds(shape, len(layout.classes), o.shard_size, processes, members).shard_images
    key = catalog.step_key("convert", VERSION, tree.digest, layout.to_dict(), per_shard, o.channels,
                           list(o.resize) if o.resize else None, *(["exact"] if o.resize and o.exact_resize else []))
    rel = catalog.shards_dir(dataset, key)
    pixels = pixels_key(layout.classes, shape, o)
    earlier = earlier_set(Root(tree.root), dataset, pixels, rel)
    jobs, plan = [], PlanWriter()
    plan_file = posixpath.join(rel, MEMBERS)
    digests = index.column("sha256")
    cuts = []
    for role, folder, rows in splits:
        cuts.append((role, folder, assign(rows, role, earlier, per_shard,
                                          digests.take(rows.column("row")) if earlier else None)))
        release()
    del splits, earlier
    shards = sum(len(chunks) for _, _, chunks in cuts)
    if shards > MANY_SHARDS and per_shard < Options.shard_size:
        log.warning("%d shards of at most %d images: each is a task of its own (about 0.1 s apiece with Prefect); "
                    "a larger --shard-size (default %d) is faster", shards, per_shard, Options.shard_size)
    # the pool pays for itself by the images to decode, not those an earlier set already holds
    parallel = sum(len(chunk) for _, _, shards in cuts for source, chunk in shards if source is None) >= POOL_MIN_IMAGES
    for role, folder, shards in cuts:
        for i, (source, chunk) in enumerate(shards):
            chunk = members_of(index, chunk)
            file = catalog.shard_file(rel, role, i, len(shards))
            jobs.append(ShardJob(root=tree.root, dir=rel, name=f"convert-{role}-{i:05d}", split=role, folder=folder,
                                 file=file, plan=plan_file, group=len(jobs), blob=posixpath.join(tree.dir, BLOB),
                                 shape=shape, classes=tuple(layout.classes), archive_sha256=tree.archive_sha256,
                                 channels=o.channels, resize=bool(o.resize),
                                 draft=bool(o.resize) and not o.exact_resize,
                                 skip_bad=o.skip_bad > 0, parallel=parallel, digest=rows_digest(chunk),
                                 reuse=json.dumps(source) if source else ""))
            plan.add(posixpath.basename(file), chunk)
    del cuts, index
    return ShardPlan(dir=rel, classes=tuple(layout.classes), shape=shape, jobs=tuple(jobs), layout=layout,
                     pixels=pixels, plan_file=write_plan(Root(tree.root), plan_file, plan.finish()))


def members_of(index: pa.Table, rows: pa.Table) -> pa.Table:
    """Planned rows (path, label, row) as Member's columns, their digest, size and offset taken
    from the unpacked index by row number."""
    at = rows.column("row")
    return pa.table({"path": rows.column("path"), "label": rows.column("label"),
                     **{c: index.column(c).take(at) for c in ("sha256", "size", "offset")}}).select(list(Member._fields))


def write_plan(r: Root, rel: str, data: bytes) -> dict:
    """Write the set's MEMBERS file, which its jobs read their rows from, unless it already holds
    these bytes (a cached run writes nothing); returns its manifest entry. Written before the
    jobs run and listed by the manifest written after them, like every file of the set."""
    entry = {"file": rel, "sha256": sha256_bytes(data), "bytes": len(data)}
    with contextlib.suppress(OSError):
        if r.sha256(rel) == (entry["sha256"], entry["bytes"]):
            return entry
    r.write_bytes_atomic(rel, data)
    return entry


def convert_shard(job: ShardJob, refresh: bool = False) -> Outcome[Part]:
    """Decode one shard's files and publish its Parquet file as a part of its folder, on the
    shared process pool when the dataset is large enough to pay for it.

    Every bad file is listed; with `skip_bad` they are left out (never zero-filled) and
    returned, so the run can be held to its --skip-bad budget.
    """
    r = Root(job.root)

    def build() -> Part:
        if job.reuse and (part := copy_earlier(r, job)):
            return part
        meta = ShardMeta(shape=tuple(job.shape), classes=list(job.classes), split=job.folder,
                         source_sha256=job.archive_sha256)
        args = (job.root, job.blob, job.rows(), part_of(job.file), meta)
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
                    counts=dict(zip(job.classes, out["counts"])), skipped=tuple(out["errors"]), members=job.digest)
        record_part(r, job.file, part.to_dict())
        return part

    def load() -> Part:
        part = Part.from_dict(load_part(r, job.file))
        if part.members != job.digest:   # planned differently before (another earlier set, or older code)
            raise IntegrityError(f"{r.uri(job.file)}: holds other images than this plan's {job.name}")
        return part

    return reuse_or_build(r, job.file, load, build, refresh=refresh)


def copy_earlier(r: Root, job: ShardJob) -> Part | None:
    """The earlier set's shard with exactly this job's members, linked into place and re-hashed;
    None (so the shard is decoded instead) when it has gone or no longer matches its record."""
    source = Part.from_dict(json.loads(job.reuse))
    staged = part_of(job.file)
    try:
        r.link(source.file, staged)
        found = r.sha256(staged)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, IntegrityError):   # gone, or damaged
        found = None
    if found != (source.sha256, source.bytes):
        with contextlib.suppress(OSError):
            r.remove(staged)
        log.warning("%s: %s is gone or altered; decoding its images again", job.name, r.uri(source.file))
        return None
    part = dataclasses.replace(source, file=job.file, members=job.digest, reused_from=source.file)
    record_part(r, job.file, part.to_dict())
    return part


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
    copied = [x for x in parts if x.reused_from]
    reused = {"from": posixpath.dirname(copied[0].reused_from), "shards": len(copied),
              "images": sum(x.rows for x in copied)} if copied else {}
    out = ShardSet(root=root, dir=plan.dir, digest="", dataset=dataset, classes=list(plan.classes),
                   shape=list(plan.shape), counts=counts,
                   shards={s: [x.file for x in parts if x.split == s] for s in SPLITS},
                   sha256={x.file: x.sha256 for x in parts}, skipped=skipped,
                   parts={posixpath.basename(x.file): x.to_dict() for x in parts}, pixels=plan.pixels, reused=reused)
    r = Root(root)
    digest = publish_parts(r, plan.dir, [x.to_dict() for x in parts] + [plan.plan_file], record=out.record(),
                           rows={posixpath.basename(x.file): x.rows for x in parts})
    return dataclasses.replace(out, digest=digest)
