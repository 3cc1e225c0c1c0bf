"""A cheap fingerprint of what a source URL currently serves, for cache keys."""
from __future__ import annotations

import os

import fsspec
import httpx

from pixelsim.storage.archive import folder_files
from pixelsim.storage.errors import DownloadError, TransientDownloadError
from pixelsim.storage.fetch import HeaderDeadline, _cause, redact  # _cause masks secrets a library echoes
from pixelsim.storage.root import digest_json


def fingerprint(url: str, timeout: float = 5.0, skip: tuple[str, ...] = ()) -> dict:
    """Size and version markers of the file behind `url`, so a changed file is a cache miss.

    Raises DownloadError when the source cannot be reached at all (TransientDownloadError when
    its response headers do not come within `fetch.HEADERS_S`).
    """
    if url.startswith(("http://", "https://")):
        deadline = HeaderDeadline()
        try:
            with deadline, httpx.Client(follow_redirects=True, timeout=timeout) as client:
                resp = client.head(url, extensions={"trace": deadline.trace})
                deadline.arrived()
        except httpx.HTTPError as e:
            if not deadline.fired:
                raise DownloadError(redact(url), f"unreachable: {_cause(e, url)}") from None
        if deadline.fired:
            raise TransientDownloadError(redact(url), f"HEAD: {deadline.reason}")
        if resp.status_code >= 400:
            # some servers refuse HEAD; the download itself decides what the status means
            return {"status": resp.status_code}
        h = resp.headers
        return {k: h.get(k) for k in ("etag", "last-modified", "content-length") if h.get(k)}
    if os.path.isdir(url):
        # a folder changes when any file below it does: list them all (stat only)
        listing = [(rel, *_version(st)) for rel, _, st in folder_files(url, skip)]
        return {"folder": digest_json(listing), "files": len(listing)}
    local = url.removeprefix("file://") if "://" not in url or url.startswith("file://") else None
    if local is not None and os.path.isfile(local):
        st = os.stat(local)
        return dict(zip(("size", "mtime", "ino", "ctime"), map(str, _version(st))))
    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except FileNotFoundError:
        raise DownloadError(redact(url), "no such file") from None
    except Exception as e:  # noqa: BLE001 - any backend failure means unreachable
        raise DownloadError(redact(url), f"unreachable: {_cause(e, url)}") from None
    keep = ("size", "mtime", "ETag", "etag", "LastModified", "last_modified", "checksum", "md5")
    return {k: str(info[k]) for k in keep if info.get(k) is not None}


def _version(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a local file's bytes may have: besides its size and mtime (which
    `cp -p`, `rsync -t`, tar and unzip carry over from the old file, and `touch -d` sets), its
    inode and ctime, which every write, copy or rename into place gives anew."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def identifies(url: str, found: dict) -> bool:
    """Whether a fingerprint tells the file now behind `url` from another one, so that a cached
    download keyed by it may be reused. Not when the source refused HEAD or named no version
    (no ETag, modification time or checksum), and not without an ETag when the URL carries
    credentials or signed parameters: the cache key masks them (`?key=a` and `?key=b` would
    share it). Such a source is downloaded again each run; what follows is keyed by its bytes."""
    names = {k.lower().replace("_", "-") for k in found}
    if "folder" in names or names & {"etag", "checksum", "md5"}:
        return True
    return redact(url) == url and bool(names & {"last-modified", "lastmodified", "mtime"})
