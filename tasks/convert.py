"""Step 3: decode every image of the train and valid splits into Parquet shards."""
from __future__ import annotations

import hashlib
import math
import posixpath

import numpy as np

from storage.errors import ImageError, LayoutError
from storage.images import decode
from storage.layout import Layout, split_files
from storage.root import Root, digest_json
from storage.shards import ShardMeta, shard_name, write_shard
from tasks.caching import step

VERSION = "1"
SPLITS = ("train", "valid")
MAX_LISTED = 20


def tree_entries(root: Root, tree: dict) -> dict[str, dict]:
    """Manifest entries of the extracted files, keyed by their path inside the archive."""
    manifest = root.read_json(posixpath.join(tree["dir"], "manifest.json"))
    prefix = "files/"
    return {e["name"][len(prefix):]: e for e in manifest["files"] if e["name"].startswith(prefix)}


def read_image(root: Root, tree_dir: str, path: str, entry: dict, *, channels: int,
               size: tuple[int, int] | None, resize: bool) -> np.ndarray:
    """Decode one extracted file, checking its bytes against the extraction manifest."""
    data = root.read_bytes(posixpath.join(tree_dir, "files", path))
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ImageError(f"{path}: changed since extraction (does not match the manifest)")
    return decode(data, path, channels=channels, size=size, resize=resize)


def convert_tree(tree: dict, layout: dict, dataset: str, root: str, shard_size: int = 5000,
                 channels: int = 1, resize: list[int] | None = None) -> dict:
    """Write shards/<dataset>/<key>/<split>-NNNNN-of-NNNNN.parquet for train and valid.

    Every unreadable or mis-sized file is collected, so one failed run lists them all.
    """
    r = Root(root)
    lay = Layout(**layout)
    entries = tree_entries(r, tree)
    paths = list(entries)
    key = digest_json([tree["digest"], layout, shard_size, channels, resize, VERSION])[:16]
    rel = f"shards/{dataset}/{key}"
    size = tuple(resize) if resize else None
    counts: dict[str, dict[str, int]] = {}
    shards: dict[str, list[str]] = {}
    errors: list[str] = []
    with r.publish_dir(rel) as st:
        for role, folder in zip(SPLITS, (lay.train, lay.valid)):
            files = split_files(paths, lay, folder)
            if not files:
                raise LayoutError(f"split {folder}/ holds no images of classes {lay.classes}")
            labels = np.array([c for _, c in files], dtype=np.int64)
            counts[role] = {c: int((labels == i).sum()) for i, c in enumerate(lay.classes)}
            n_shards = math.ceil(len(files) / shard_size)
            shards[role] = []
            for i in range(n_shards):
                chunk = files[i * shard_size:(i + 1) * shard_size]
                images = []
                for path, _ in chunk:
                    try:
                        img = read_image(r, tree["dir"], path, entries[path], channels=channels,
                                         size=size, resize=bool(resize))
                    except ImageError as e:
                        errors.append(str(e))
                        continue
                    if size is None:
                        size = img.shape[:2]
                    images.append(img)
                if errors:
                    continue
                name = shard_name(role, i, n_shards)
                meta = ShardMeta(shape=images[0].shape, classes=lay.classes, split=folder,
                                 source_sha256=tree.get("archive_sha256", ""))
                write_shard(st.file(name), meta, [p for p, _ in chunk], labels[i * shard_size:][:len(chunk)],
                            np.stack(images))
                st.add(name)
                shards[role].append(f"{rel}/{name}")
        if errors:
            listed = "\n  ".join(errors[:MAX_LISTED])
            more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
            raise ImageError(f"{len(errors)} bad image file(s) in {r.uri(tree['dir'])}/files:\n  {listed}{more}")
        st.meta.update(dataset=dataset, classes=lay.classes, shape=list(size) + ([3] if channels == 3 else []),
                       counts=counts)
    return {"root": root, "dir": rel, "digest": st.digest, "classes": lay.classes,
            "shape": list(size) + ([3] if channels == 3 else []), "counts": counts, "shards": shards}


convert = step("convert", VERSION)(convert_tree)
