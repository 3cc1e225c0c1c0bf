"""Step 3: decode every image of the train and valid splits into Parquet shards.

Planned once, then one task per shard (`convert-train-00003`), so shards convert in
parallel on any task runner, cache one by one, and a lost shard is rebuilt alone.
"""
from __future__ import annotations

import json
import math
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from storage.archive import BLOB, INDEX, read_index
from storage.errors import ImageError, LayoutError, TransientError
from storage.images import decode_members, peek_size
from storage.layout import Layout, split_files
from storage.root import MANIFEST, Root, digest_json, part_of, publish_parts
from storage.shards import ShardMeta, build_shard, member_bytes, shard_name
from tasks import pool
from tasks.caching import step

VERSION = "4"
SPLITS = ("train", "valid")
MAX_LISTED = 20
# Below this many files a process pool's start (about 0.3 s) costs more than its cores save.
POOL_MIN_IMAGES = 50_000


def tree_listing(root: Root, tree: dict) -> tuple[dict[str, tuple[int, int, str]], list[str]]:
    """{path inside the archive: (offset, size, sha256)} of the unpacked members, and the
    archive's folders (an empty class folder has no file to show it)."""
    manifest = root.read_json(posixpath.join(tree["dir"], MANIFEST))
    index = read_index(root.read_bytes(posixpath.join(tree["dir"], INDEX)))
    cols = [index.column(c).to_pylist() for c in ("path", "offset", "size", "sha256")]
    return {p: (o, n, h) for p, o, n, h in zip(*cols)}, manifest.get("dirs", [])


def tree_entries(root: Root, tree: dict) -> dict[str, tuple[int, int, str]]:
    return tree_listing(root, tree)[0]


def read_members(root: Root, tree: dict, files: list[list]) -> list[bytes]:
    """Plan entries' bytes from this unpacked archive's members blob."""
    return member_bytes(root, posixpath.join(tree["dir"], BLOB), files)


def common_size(root: Root, tree: dict, files: list[list], sample: int = 101) -> tuple[int, int]:
    """The most common image size among evenly spread training files, so that one odd file,
    even the first, is the one reported as mis-sized."""
    picked = files[::max(1, len(files) // sample)][:sample]
    sizes = Counter(peek_size(data) for data in read_members(root, tree, picked))
    sizes.pop(None, None)
    if not sizes:
        first = files[0]
        return read_image(read_members(root, tree, [first])[0], first, channels=1, size=None,
                          resize=False).shape[:2]
    return max(sizes.items(), key=lambda kv: kv[1])[0]


def read_image(data: bytes, entry: list, *, channels: int, size: tuple[int, int] | None,
               resize: bool) -> np.ndarray:
    """Decode one member, checking its bytes against the unpacking index first."""
    images, _, errors = decode_members([(entry[0], entry[2], data)], channels=channels, size=size, resize=resize)
    if errors:
        raise ImageError(errors[0])
    return images[0]


def pack_entries(entries: list[list]) -> str:
    """A shard's file list as one JSON string: Prefect walks every item of a nested task argument
    (1.4 s per run for 14k files), never the inside of a string."""
    return json.dumps(entries, separators=(",", ":"))


def plan_shards(tree: dict, layout: dict, dataset: str, root: str, shard_size: int = 5000,
                channels: int = 1, resize: list[int] | None = None,
                entries: dict[str, tuple[int, int, str]] | None = None) -> dict:
    """Split both splits' files into shards; fix the image shape from the first training image.

    Returns {"dir", "shape", "counts", "plans"}; each plan lists its files with their digests
    (a JSON string, see pack_entries) so a shard task's cache key changes exactly when its own
    inputs do. `entries` is `tree_entries` when the caller has already read it.
    """
    r = Root(root)
    lay = Layout(**layout)
    entries = entries if entries is not None else tree_entries(r, tree)
    rel = f"shards/{dataset}/{digest_json([tree['digest'], layout, shard_size, channels, resize, VERSION])[:16]}"
    plans, counts, train = [], {}, []
    parallel = len(entries) >= POOL_MIN_IMAGES
    for role, folder in zip(SPLITS, (lay.train, lay.valid)):
        files = split_files(list(entries), lay, folder)
        if not files:
            raise LayoutError(f"split {folder}/ holds no images of classes {', '.join(lay.classes)}")
        labels = np.array([c for _, c in files])
        counts[role] = {c: int((labels == i).sum()) for i, c in enumerate(lay.classes)}
        n = math.ceil(len(files) / shard_size)
        for i in range(n):
            chunk = [[p, c, entries[p][2], entries[p][1], entries[p][0]]
                     for p, c in files[i * shard_size:(i + 1) * shard_size]]
            train += chunk if role == "train" else []
            plans.append({"split": role, "folder": folder, "index": i, "count": n,
                          "name": f"convert-{role}-{i:05d}", "file": f"{rel}/{shard_name(role, i, n)}",
                          "files": pack_entries(chunk), "parallel": parallel})
    shape = list(resize) if resize else list(common_size(r, tree, train))
    shape += [3] if channels == 3 else []
    return {"dir": rel, "shape": shape, "counts": counts, "classes": lay.classes, "plans": plans}


def convert_shard(plan: dict, tree: dict, classes: list[str], shape: list[int], root: str,
                  channels: int = 1, resize: bool = False, skip_bad: bool = False) -> dict:
    """Decode one shard's files and publish its Parquet file, on the shared process pool when
    the dataset is large enough to pay for it.

    Every bad file is listed; with `skip_bad` they are left out (never zero-filled) and
    returned, so the flow can hold the whole run to its --skip-bad budget.
    """
    meta = ShardMeta(shape=tuple(shape), classes=classes, split=plan["folder"],
                     source_sha256=tree.get("archive_sha256", ""))
    args = (root, posixpath.join(tree["dir"], BLOB), json.loads(plan["files"]), part_of(plan["file"]), meta)
    kw = {"channels": channels, "resize": resize, "skip_bad": skip_bad}
    ex = pool.pool() if plan.get("parallel") else None
    try:
        out = ex.submit(build_shard, *args, **kw).result() if ex else build_shard(*args, **kw)
    except BrokenProcessPool as e:  # a worker died (OOM killer, signal): the task retries on a new pool
        pool.discard(ex)
        raise TransientError(f"{plan['name']}: a shard-building worker process died ({e})") from e
    if out["errors"] and not skip_bad:
        raise BadImages(out["errors"])
    return {"root": root, "file": plan["file"], "sha256": out["sha256"], "bytes": out["bytes"], "rows": out["rows"],
            "split": plan["split"], "skipped": out["errors"], "counts": dict(zip(classes, out["counts"]))}


class BadImages(ImageError):
    """Every unreadable or mis-sized file of a shard (or of a whole run, once merged)."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        listed = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        super().__init__(f"{len(errors)} bad image file(s):\n  {listed}{more}")

    def __reduce__(self):  # keep the list when crossing a process boundary
        return (BadImages, (self.errors,))


def finish_shards(plan: dict, results: list[dict], root: str, skip_bad: int = 0) -> dict:
    """Hold the run to its bad-file budget, publish the shard folder's manifest (last) and
    describe the whole set."""
    skipped = [e for x in results for e in x["skipped"]]
    if len(skipped) > skip_bad:
        raise BadImages(skipped)
    counts = {s: {c: sum(x["counts"][c] for x in results if x["split"] == s) for c in plan["classes"]}
              for s in SPLITS}
    digest = publish_parts(Root(root), plan["dir"], results, classes=plan["classes"], shape=plan["shape"],
                           counts=counts, rows={posixpath.basename(x["file"]): x["rows"] for x in results})
    shards = {s: [x["file"] for x in results if x["split"] == s] for s in SPLITS}
    return {"root": root, "dir": plan["dir"], "digest": digest, "classes": plan["classes"],
            "shape": plan["shape"], "counts": counts, "shards": shards, "skipped": skipped,
            "sha256": {x["file"]: x["sha256"] for x in results}}


def convert_tree(tree: dict, layout: dict, dataset: str, root: str, shard_size: int = 5000,
                 channels: int = 1, resize: list[int] | None = None, skip_bad: int = 0) -> dict:
    """All shards without Prefect (benchmarks, scripts); large datasets are built on every core
    by the shared pool."""
    plan = plan_shards(tree, layout, dataset, root, shard_size, channels, resize)
    args = [(p, tree, plan["classes"], plan["shape"], root, channels, bool(resize), skip_bad > 0)
            for p in plan["plans"]]
    # a thread per pool worker keeps every worker busy; without the pool threads would only contend for the GIL
    parallel = bool(plan["plans"] and plan["plans"][0].get("parallel"))
    with ThreadPoolExecutor(max(1, pool.workers()) if parallel else 1) as threads:
        outcomes = list(threads.map(lambda a: _outcome(lambda: convert_shard(*a)), args))
    errors = [e for o in outcomes if isinstance(o, BadImages) for e in o.errors]
    if errors:
        raise BadImages(errors)
    for o in outcomes:
        if isinstance(o, BaseException):
            raise o
    return finish_shards(plan, outcomes, root, skip_bad)


def _outcome(result) -> dict | BadImages:
    try:
        return result()
    except BadImages as e:
        return e


convert = step("convert", VERSION)(convert_shard)
