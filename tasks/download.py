"""Step 1: fetch the dataset archive into the storage root, verified by size and checksum."""
from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from urllib.parse import urlsplit

from storage.archive import pack_folder
from storage.fetch import Fetched, Pins, fetch, redact
from storage.root import Root, publish_file
from tasks.caching import step

VERSION = "1"


def archive_name(url: str) -> str:
    """A safe file name for the archive, taken from the URL's last path component."""
    name = posixpath.basename((urlsplit(url).path if "://" in url else url.replace(os.sep, "/")).rstrip("/"))
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "archive"


def dataset_name(url: str) -> str:
    """What a --source is filed under when no --dataset is given: its name without suffixes."""
    name = archive_name(url)
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip"):
        name = name.removesuffix(suffix)
    return name.lower() or "dataset"


def download_archive(url: str, root: str, pins: dict | None = None, attempts: int = 5,
                     fingerprint: dict | None = None) -> dict:
    """Fetch `url` and publish it content-addressed as archives/<sha256[:16]>/<name>.

    `fingerprint` (remote size/etag/mtime) is unused here: it is part of the cache key so
    that a changed file behind the same URL is fetched again.
    """
    r = Root(root)
    name = archive_name(url)
    staging = r.path("archives") if r.local else None
    if staging:
        os.makedirs(staging, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".incoming-", dir=staging)
    try:
        if os.path.isdir(url):
            got = _pack(url, os.path.join(tmp_dir, f"{name}.tar"), Pins(**(pins or {})))
            name = f"{name}.tar"
        else:
            got = fetch(url, os.path.join(tmp_dir, name), pins=Pins(**(pins or {})), attempts=attempts)
        rel = f"archives/{got.sha256[:16]}/{name}"
        publish_file(r, got.path, rel)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"root": root, "file": rel, "url": redact(url), "sha256": got.sha256, "bytes": got.size,
            "md5_head": got.md5_head}


def _pack(folder: str, dest: str, pins: Pins) -> Fetched:
    """An extracted local folder becomes a deterministic tar, then is checked like a download."""
    pack_folder(folder, dest)
    return fetch(dest, dest + ".checked", pins=pins, attempts=1)


download = step("download", VERSION)(download_archive)
