"""Where every output lives in the storage root: the one place that builds those paths.

A step's content key (its name, code version and inputs, digested) names its output
folder, so the root alone says whether a step's work is already done: a folder whose
manifest verifies is the cached result. Outputs that analysts glob are scoped by dataset.

    archives/<key>/<name>                          download (key: source, fingerprint, pins)
    extracted/<key>/members.bin, members.parquet   untar (key: the archive's sha256, caps)
    shards/<dataset>/<key>/<split>-NNNNN-of-NNNNN.parquet, _plan/members.parquet
    templates/<dataset>/<key>/templates.parquet, <class>.png (see template_images)
    evaluations/<dataset>/<key>/predictions-*.parquet, _metrics.json
    reports/<dataset>/<key>/report.json, report.md, report.html, confusion-<metric>.csv
    runs/<dataset>/<run id>.json                   what one run used and produced
    history/<start>-<run id>.parquet               one row per run and metric
"""
from __future__ import annotations

import posixpath
import re
import unicodedata
from collections import Counter
from typing import Any

from pixelsim.storage.root import MANIFEST, digest_json

HISTORY = "history"
RUNS = "runs"
KEY_LENGTH = 16
# a dataset name becomes a folder name: one safe path component, never a way out of the root
_DATASET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def step_key(step: str, version: str, *inputs: Any) -> str:
    """The content key of a step's output: changes exactly when its code or inputs do."""
    return digest_json([step, version, *inputs])[:KEY_LENGTH]


def checked_dataset(name: str) -> str:
    if not _DATASET.fullmatch(name) or ".." in name:
        raise ValueError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-' "
                         "(it names folders in the storage root)")
    return name


def archive_dir(key: str) -> str:
    return f"archives/{key}"


def tree_dir(key: str) -> str:
    return f"extracted/{key}"


def shards_dir(dataset: str, key: str) -> str:
    return f"shards/{checked_dataset(dataset)}/{key}"


def templates_dir(dataset: str, key: str) -> str:
    return f"templates/{checked_dataset(dataset)}/{key}"


TEMPLATE_NAME_BYTES = 200   # a file name is at most 255 bytes on most file systems; a class folder's name inside an archive is not


def template_images(classes: list[str]) -> list[str]:
    """The file name of each class's template picture: `<class>.png`, unless the name is too long
    for a file name, holds control characters, starts like a digest name (`class-`), or is the
    same as another class's name on a file system that ignores case or Unicode normalization
    (`A` and `a`, NFC and NFD: macOS, Windows); then `class-<sha256 of the name>.png`."""
    def folded(cls: str) -> str:
        return unicodedata.normalize("NFC", cls).casefold()

    shared = Counter(folded(c) for c in classes)
    return [f"{cls}.png" if cls.isprintable() and len(cls.encode("utf-8", "surrogateescape")) <= TEMPLATE_NAME_BYTES
            and shared[folded(cls)] == 1 and not folded(cls).startswith("class-")
            else f"class-{digest_json(cls)[:32]}.png" for cls in classes]


def evaluation_dir(dataset: str, key: str) -> str:
    return f"evaluations/{checked_dataset(dataset)}/{key}"


def report_dir(dataset: str, key: str) -> str:
    return f"reports/{checked_dataset(dataset)}/{key}"


def shard_manifests(dataset: str) -> str:
    """A glob of the manifests of every shard set of a dataset."""
    return f"shards/{checked_dataset(dataset)}/*/{MANIFEST}"


def shard_file(folder: str, split: str, index: int, count: int) -> str:
    return posixpath.join(folder, f"{split}-{index:05d}-of-{count:05d}.parquet")


_SHARD_NAME = re.compile(r"[a-z]+-\d{5,}-of-\d{5,}\.parquet")


def is_shard_name(name: str) -> bool:
    """Whether a name read from a manifest is a shard file name as `shard_file` makes them (never a path)."""
    return _SHARD_NAME.fullmatch(name) is not None


def predictions_file(folder: str, shard: str) -> str:
    return posixpath.join(folder, f"predictions-{posixpath.basename(shard).removesuffix('.parquet')}.parquet")


def predictions_glob(folder: str) -> str:
    return posixpath.join(folder, "predictions-*.parquet")


def metrics_file(folder: str) -> str:
    return posixpath.join(folder, "_metrics.json")


def run_record(dataset: str, run_id: str) -> str:
    return f"{RUNS}/{checked_dataset(dataset)}/{run_id}.json"


def key_of(folder: str) -> str:
    """The key a folder is named by (its last component)."""
    return posixpath.basename(folder.rstrip("/"))
