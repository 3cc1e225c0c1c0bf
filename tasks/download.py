"""Step 1: fetch the dataset archive into the storage root, verified by size and checksum."""
from __future__ import annotations

import dataclasses

import os
import posixpath
import re
from urllib.parse import urlsplit

from pixelsim.storage import catalog
from pixelsim.storage.archive import pack_folder
from pixelsim.storage.cache import Outcome, reuse_or_build
from pixelsim.storage.errors import DownloadError
from pixelsim.storage.fetch import Fetched, Pins, fetch, max_bytes, redact
from pixelsim.storage.root import MANIFEST, Root
from pixelsim.storage.sources import identifies
from pixelsim.tasks.contracts import Archive

VERSION = "3"


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


def archive_dir(url: str, pins: dict | None, fingerprint: dict | None = None) -> str:
    """Where the archive of this source lives in the root. Pinned bytes (a sha256, or fastai's
    size and md5 of the first MiB) are keyed by the pins alone: the same bytes from any URL or
    path, and found without asking the source anything."""
    pins = pins or {}
    if pins.get("sha256"):
        inputs = ["sha256", pins["sha256"].lower()]
    elif pins.get("size") and pins.get("md5_head"):
        inputs = ["pins", pins["size"], pins["md5_head"]]
    else:
        inputs = [redact(url), fingerprint or {}, pins]
    return catalog.archive_dir(catalog.step_key("download", VERSION, *inputs))


def in_root(root: str, url: str, pins: dict | None) -> bool:
    """Whether the pinned archive of this source is published in the root (no network). Only its
    manifest is read: the download step then verifies the bytes (and fetches them again if damaged)."""
    try:
        Root(root).read_json(posixpath.join(archive_dir(url, pins), MANIFEST))["record"]
        return True
    except (OSError, ValueError, LookupError, TypeError):
        return False


def download_archive(url: str, root: str, pins: dict | None = None, attempts: int = 5,
                     fingerprint: dict | None = None, refresh: bool = False, offline: bool = False) -> Outcome[Archive]:
    """Fetch `url` into archives/<key>/<name>. A source pinned by sha256 is keyed by that digest
    alone (the same bytes from any URL or path, e.g. the bundled copy in another checkout); any
    other by the source, its fingerprint (remote size/etag/mtime, so a changed file behind the
    same URL is fetched again) and its pins. `offline`: a remote source is only ever taken from
    the root (verified), never fetched, not even to replace a damaged copy or for `refresh`."""
    r = Root(root)
    shown = redact(url)
    rel = archive_dir(url, pins, fingerprint)
    remote = "://" in url and not url.startswith("file://")
    # unpinned, and a fingerprint that cannot tell one file from another: fetched again, never
    # taken from the cache on the strength of its (masked) URL alone
    refresh = (refresh or (not pins and fingerprint is not None and not identifies(url, fingerprint))) \
        and not (offline and remote)

    def build() -> Archive:
        if offline and remote:
            raise DownloadError(shown, f"--offline: the copy in {r.uri(rel)} is missing or damaged, and fetching "
                                       "it again needs the network; run without --offline")
        name = archive_name(url)
        with r.publish_dir(rel) as st:
            if os.path.isdir(url):
                name = f"{name}.tar"
                got = _pack(url, st.file(name), Pins(**(pins or {})), skip=r.skip())
            else:
                got = fetch(url, st.file(name), pins=Pins(**(pins or {})), attempts=attempts)
            st.add(name, sha256=got.sha256, size=got.size)
            out = Archive(root=root, dir=rel, digest="", file=f"{rel}/{name}", url=shown, sha256=got.sha256,
                          bytes=got.size, md5_head=got.md5_head)
            st.meta["record"] = out.record()
        return dataclasses.replace(out, digest=st.digest)

    return reuse_or_build(r, rel, lambda: Archive.load(root, rel), build, refresh=refresh)


def _pack(folder: str, dest: str, pins: Pins, skip: tuple[str, ...] = ()) -> Fetched:
    """An extracted local folder becomes a deterministic tar, then is checked like a download."""
    pack_folder(folder, dest + ".packed", skip, max_bytes=pins.size or max_bytes())
    try:
        return fetch(dest + ".packed", dest, pins=pins, attempts=1)
    finally:
        os.remove(dest + ".packed")
