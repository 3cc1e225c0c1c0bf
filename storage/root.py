"""The storage root: one fsspec location holding every artifact, published atomically.

Readers trust only what a `_manifest.json` lists: each artifact folder is written under
a temporary name, its manifest last, and then renamed into place.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pixelsim.storage.errors import IntegrityError, NotPublished, StorageError, backend_failure, first_line
from pixelsim.storage.faults import publishing

# What the disk says when it cannot take more (full, over quota, over a file size limit,
# read-only): these name the file being written, since the call that failed (a write, a
# flush, pyarrow's writer) often names none.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
MANIFEST = "_manifest.json"
PARTS = "_parts"   # parts written by parallel tasks wait here until their folder is published
CHUNK = 1 << 20


@contextlib.contextmanager
def writing(where: str) -> Iterator[None]:
    """Name `where` in a full-disk error raised inside the block that names no file."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS or e.filename or hasattr(e, "url"):
            raise
        raise OSError(e.errno, os.strerror(e.errno), where) from e


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def digest_json(obj: Any) -> str:
    """A stable digest of JSON-able data, used for cache keys and folder names."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def sealed(body: dict[str, Any]) -> dict[str, Any]:
    """`body` (a manifest, a part's record) with a `digest` of all of it, so that a changed byte
    anywhere in it (a file's hash, a part's figures, the record) is caught by `seal_ok`."""
    body = json.loads(json.dumps(body, default=str))   # as it will read back
    return {"digest": digest_json(body), **body}


def seal_ok(body: Any) -> bool:
    return isinstance(body, dict) and body.get("digest") == digest_json({k: v for k, v in body.items() if k != "digest"})


_BUCKET_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}   # roots whose first component is a bucket


def _shown_url(url: str) -> str:
    from pixelsim.storage.fetch import redact   # imported here: fetch brings httpx, which a root rarely needs
    return redact(url)


class Root:
    """A storage root URL (local folder by default, any fsspec URL otherwise)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        try:
            self.fs, base = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except Exception as e:  # noqa: BLE001 - unknown protocols, missing backends, chained URLs of bad archives
            raise StorageError(f"--root {_shown_url(url)}: not a usable storage root: {first_line(e)}") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        self.base = os.path.abspath(base) if self.local else base.rstrip("/")

    def ensure(self) -> None:
        """Create a local root now, so that an unusable one (a file, no permission, a read-only
        disk) fails before any work, naming itself; an object store is asked for its root once,
        so that missing credentials or an unknown bucket fail the same way."""
        if self.local:
            os.makedirs(self.base, exist_ok=True)
            return
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        bucket = self.base.split("/")[0] if protocols & _BUCKET_STORES else ""
        try:
            missing = not self.fs.exists(self.base) and bool(bucket) and not self.fs.exists(bucket)
        except Exception as e:  # noqa: BLE001 - a backend's errors have no common base
            if isinstance(e, OSError) and not backend_failure(e):
                raise
            raise StorageError(f"--root {_shown_url(self.url)}: the storage backend refused: {first_line(e)}") from None
        if missing:
            raise StorageError(f"--root {_shown_url(self.url)}: there is no bucket {bucket} (or these credentials "
                               "cannot see it): create it first")

    # -- paths -----------------------------------------------------------------
    def skip(self) -> tuple[str, ...]:
        """What a folder source must leave out: this root, when it is a local folder (it may lie
        inside the source, e.g. `--source .` with the default root)."""
        return (self.base,) if self.local else ()

    def path(self, rel: str) -> str:
        return posixpath.join(self.base, rel) if rel else self.base

    def uri(self, rel: str) -> str:
        """A full address a person or an analytics tool can open."""
        full = self.path(rel)
        return full if self.local else self.fs.unstrip_protocol(full)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    # -- files -----------------------------------------------------------------
    def read_bytes(self, rel: str, limit: int | None = None) -> bytes:
        """The whole file; with `limit`, an IntegrityError instead for a file over that many
        bytes (a small record that has grown huge is damage, never read whole)."""
        if limit is not None and (os.stat(self.regular(rel)).st_size if self.local else self.fs.size(self.path(rel))) > limit:
            raise IntegrityError(f"{self.uri(rel)}: over {limit} bytes, more than it can hold")
        if self.local:  # the hot path of convert: fsspec costs more than the decode here
            with open(self.regular(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel))

    def regular(self, rel: str) -> str:
        """The local path of `rel`, unless it is a FIFO, a device or a socket (or a link to one):
        reading those would block for ever or never end, so in a root they are damage, rebuilt
        like any other. A folder is left to the open that follows (IsADirectoryError)."""
        full = self.path(rel)
        mode = os.stat(full).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise IntegrityError(f"{self.uri(rel)}: not a regular file (a FIFO, device or socket in its place)")
        return full

    def read_ranges(self, rel: str, ranges: list[tuple[int, int]], *, gap: int = 1 << 16,
                    block: int = 1 << 24) -> list[bytes]:
        """The bytes at each (offset, size) of one file, in the order asked.

        Nearby ranges are merged into reads of at most `block` bytes, so a shard's images
        cost a few large reads (local or remote) instead of one request each.
        """
        order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        spans: list[tuple[int, int, list[int]]] = []  # start, end, indices
        for i in order:
            off, size = ranges[i]
            if spans and off - spans[-1][1] <= gap and off + size - spans[-1][0] <= block:
                start, end, members = spans[-1]
                members.append(i)
                spans[-1] = (start, max(end, off + size), members)
            else:
                spans.append((off, off + size, [i]))
        out: list[bytes] = [b""] * len(ranges)
        full = self.path(rel)
        if self.local:
            with open(self.regular(rel), "rb", buffering=0) as f:
                datas = [os.pread(f.fileno(), end - start, start) for start, end, _ in spans]
        else:
            datas = self.fs.cat_ranges([full] * len(spans), [s for s, _, _ in spans], [e for _, e, _ in spans])
        for (start, end, members), data in zip(spans, datas):
            if len(data) != end - start:
                raise IntegrityError(f"{self.uri(rel)}: shorter than its index says (truncated)")
            for i in members:
                off, size = ranges[i]
                out[i] = data[off - start:off - start + size]
        return out

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def open(self, rel: str, mode: str = "rb") -> BinaryIO:
        if self.local and "r" in mode:
            self.regular(rel)
        return self.fs.open(self.path(rel), mode)

    def sha256(self, rel: str) -> tuple[str, int]:
        h, n = hashlib.sha256(), 0
        with self.open(rel) as f:
            while block := f.read(CHUNK):
                h.update(block)
                n += len(block)
        return h.hexdigest(), n

    def remove(self, rel: str) -> None:
        full = self.path(rel)
        if self.local:
            if os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)
            elif os.path.lexists(full):
                os.remove(full)
        elif self.fs.exists(full):
            self.fs.rm(full, recursive=True)

    @contextlib.contextmanager
    def local_file(self, rel: str) -> Iterator[str]:
        """A local path to read `rel` from: itself when local, a temporary copy otherwise."""
        if self.local:
            yield self.regular(rel)
            return
        with tempfile.TemporaryDirectory(prefix="pixelsim-") as tmp:
            dest = os.path.join(tmp, posixpath.basename(rel))
            self.fs.get(self.path(rel), dest)
            yield dest

    # -- atomic publication ----------------------------------------------------
    @contextlib.contextmanager
    def publish_dir(self, rel: str) -> Iterator["Staging"]:
        """Stage a folder and rename it onto `rel` only if the block succeeds.

        An existing folder at `rel` (stale or corrupt) is replaced; on failure nothing
        under `rel` changes and the staging folder is removed.
        """
        if self.local:
            tmp_root = self.path(f"{rel}.tmp-{uuid.uuid4().hex[:12]}")
            os.makedirs(tmp_root)
            staging = Staging(tmp_root)
            try:
                with writing(self.path(rel)):
                    yield staging
                    staging.write_manifest()
                publishing(rel)
                self._swap_local(tmp_root, self.path(rel))
            finally:
                shutil.rmtree(tmp_root, ignore_errors=True)
            return
        with tempfile.TemporaryDirectory(prefix="pixelsim-") as tmp_root:
            staging = Staging(tmp_root)
            with writing(self.uri(rel)):
                yield staging
                staging.write_manifest()
            publishing(rel)
            # An object store has no folder rename (a "move" copies object by object, in no useful
            # order): unpublish the old folder manifest first, upload every listed file to its final
            # name (concurrently), then the manifest last, which is what publishes the folder.
            self.remove(posixpath.join(rel, MANIFEST))
            self.remove(rel)
            names = sorted(staging.files)
            try:
                if names:
                    self.fs.put([staging.file(n) for n in names], [self.path(posixpath.join(rel, n)) for n in names])
                self.fs.put_file(os.path.join(tmp_root, MANIFEST), self.path(posixpath.join(rel, MANIFEST)))
            except BaseException:
                self.remove(rel)
                raise

    @staticmethod
    def _swap_local(src: str, dest: str) -> None:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.rename(src, dest)
        except OSError:
            # dest exists: move it aside, then swap, then drop the old one
            old = f"{dest}.old-{uuid.uuid4().hex[:12]}"
            os.rename(dest, old)
            os.rename(src, dest)
            shutil.rmtree(old, ignore_errors=True)

    @contextlib.contextmanager
    def staged_file(self, rel: str) -> Iterator[str]:
        """A local path to write `rel` to, published by rename only if the block succeeds."""
        if not self.local:
            with tempfile.TemporaryDirectory(prefix="pixelsim-") as tmp_dir:
                tmp = os.path.join(tmp_dir, posixpath.basename(rel))
                with writing(self.uri(rel)):
                    yield tmp
                publish_file(self, tmp, rel)
            return
        full = self.path(rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        tmp = f"{full}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with writing(full):
                yield tmp
            publishing(rel)
            clear_folder(full)
            os.replace(tmp, full)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def glob(self, pattern: str) -> list[str]:
        """Root-relative paths matching a glob pattern (relative to the root), sorted."""
        top = self.base + "/"
        return sorted(p[len(top):] for p in self.fs.glob(self.path(pattern)) if p.startswith(top))

    def modified(self, rel: str) -> float:
        """When `rel` was last written (seconds since the epoch)."""
        if self.local:
            return os.stat(self.path(rel)).st_mtime
        return self.fs.modified(self.path(rel)).timestamp()

    def link(self, src: str, dest: str) -> None:
        """Put a copy of the published file `src` at `dest` without reading it through Python:
        a hard link on local disk (files are never changed in place, only replaced), else the
        file system's own copy (server-side on an object store). `dest` appears whole or not at all."""
        full = self.path(dest)
        tmp = f"{full}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            if self.local:
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with writing(full):
                    source = self.regular(src)
                    try:
                        os.link(source, tmp)
                    except OSError:   # another file system, or one without hard links
                        shutil.copyfile(source, tmp)
                clear_folder(full)
                os.replace(tmp, full)
            else:
                self.fs.copy(self.path(src), tmp)
                self.fs.mv(tmp, full)
        except BaseException:   # never leave a .tmp- file behind
            with contextlib.suppress(OSError):
                self.remove(tmp[len(self.base) + 1:])
            raise

    def promote(self, src: str, dest: str) -> None:
        """Move a finished part into its published place (a rename on local disk)."""
        if self.local:
            os.makedirs(os.path.dirname(self.path(dest)), exist_ok=True)
            clear_folder(self.path(dest))
            os.replace(self.path(src), self.path(dest))
        else:
            self.fs.mv(self.path(src), self.path(dest))

    def write_manifest(self, rel: str, files: list[dict], **meta: Any) -> str:
        """Publish the manifest of a folder whose files were published one by one; returns its digest.

        Unchanged manifests are not rewritten, so a fully cached run writes nothing.
        """
        body = sealed({"files": sorted(files, key=lambda f: f["name"]), **meta})
        digest = body["digest"]
        name = posixpath.join(rel, MANIFEST)
        try:
            if self.read_json(name) == body:
                return digest
        except (FileNotFoundError, ValueError, IsADirectoryError, NotADirectoryError, IntegrityError):
            pass
        publishing(rel)
        self.write_bytes_atomic(name, json.dumps(body, indent=1).encode())
        return digest

    def write_bytes_atomic(self, rel: str, data: bytes, tmp_name: str | None = None) -> None:
        """Write `rel` whole or not at all, by way of `tmp_name` (default: beside it, `.tmp-` added),
        which never stays behind."""
        full = self.path(rel)
        tmp = self.path(tmp_name) if tmp_name else f"{full}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with writing(full):
                if self.local:
                    os.makedirs(os.path.dirname(full), exist_ok=True)
                    clear_folder(full)
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, full)
                else:
                    self.fs.pipe_file(tmp, data)
                    self.fs.mv(tmp, full)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm_file(tmp)
            raise

    # -- manifests -------------------------------------------------------------
    def manifest(self, rel: str) -> dict:
        """The manifest of the folder `rel`, once its digest matches its content (its files unchecked)."""
        try:
            manifest = self.read_json(posixpath.join(rel, MANIFEST))
        except FileNotFoundError:
            raise NotPublished(f"{self.uri(rel)}: no manifest (missing or never published)") from None
        except (ValueError, IsADirectoryError, NotADirectoryError) as e:
            raise IntegrityError(f"{self.uri(rel)}: unreadable manifest: {e}") from None
        if not seal_ok(manifest):
            raise IntegrityError(f"{self.uri(posixpath.join(rel, MANIFEST))}: altered (its digest does not match "
                                 "its content), or written by an older pixelsim")
        return manifest

    def verify(self, rel: str, *, deep: bool | tuple[str, ...] = True) -> dict:
        """Check a published folder against its manifest; return the manifest.

        `deep` re-hashes every file (or, as a tuple of names, those files); the others' sizes
        are compared (for large files whose bytes are hashed again anyway when they are read).
        """
        manifest = self.manifest(rel)
        listed: dict[str, int] | None = None
        if deep is not True and not self.local:   # one listing, not a request per file
            top = self.path(rel) + "/"
            listed = {p[len(top):]: i["size"] for p, i in self.fs.find(top, detail=True).items() if p.startswith(top)}
        for entry in manifest["files"]:
            name = posixpath.join(rel, entry["name"])
            try:
                if deep is True or (deep and entry["name"] in deep):
                    digest, size = self.sha256(name)
                elif listed is not None:
                    digest, size = entry["sha256"], listed.get(entry["name"])
                    if size is None:
                        raise FileNotFoundError(name)
                else:
                    digest, size = entry["sha256"], self.fs.size(self.path(name))
            except FileNotFoundError:
                raise IntegrityError(f"{self.uri(name)}: listed in the manifest but missing") from None
            except (IsADirectoryError, NotADirectoryError):
                raise IntegrityError(f"{self.uri(name)}: not a file") from None
            if size != entry["bytes"] or digest != entry["sha256"]:
                raise IntegrityError(f"{self.uri(name)}: does not match its manifest (altered or truncated)")
        return manifest


class Staging:
    """A local staging folder whose files are recorded for the manifest as they are added."""

    def __init__(self, path: str):
        self.path = path
        self.files: dict[str, dict] = {}
        self.meta: dict[str, Any] = {}
        self.digest = ""

    def file(self, name: str) -> str:
        full = os.path.join(self.path, *name.split("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def add(self, name: str, *, sha256: str | None = None, size: int | None = None) -> None:
        """Record a file written under `name`; hashes it unless the caller already did."""
        if sha256 is None or size is None:
            sha256, size = sha256_file(self.file(name))
        self.files[name] = {"name": name, "bytes": size, "sha256": sha256}

    def write_bytes(self, name: str, data: bytes) -> None:
        with open(self.file(name), "wb") as f:
            f.write(data)
        self.add(name, sha256=sha256_bytes(data), size=len(data))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def write_manifest(self) -> None:
        body = sealed({"files": [self.files[k] for k in sorted(self.files)], **self.meta})
        self.digest = body["digest"]
        with open(os.path.join(self.path, MANIFEST), "w") as f:
            json.dump(body, f, indent=1)


def clear_folder(full: str) -> None:
    """A folder where a file of the root is to go is damage (a file turned into a folder): it
    goes, so the file can be published; a rename onto it would fail on every rerun."""
    if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full)


def publish_file(root: Root, local_path: str, rel: str) -> None:
    """Move a finished local file into the root under `rel`, atomically."""
    full = root.path(rel)
    publishing(rel)
    if root.local:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        clear_folder(full)
        os.replace(local_path, full)
        return
    tmp = f"{full}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        root.fs.put_file(local_path, tmp)
        root.fs.mv(tmp, full)
    except BaseException:   # never leave a .tmp- object behind
        with contextlib.suppress(OSError):
            root.fs.rm_file(tmp)
        raise


def part_of(rel: str) -> str:
    """Where a parallel task writes the file that its folder's publication will promote to `rel`."""
    return posixpath.join(posixpath.dirname(rel), PARTS, posixpath.basename(rel))


def part_record(rel: str) -> str:
    """Where a part's record (its sha256, size and what its folder needs) waits beside it."""
    return part_of(rel) + ".json"


def publish_parts(root: Root, folder: str, results: list[dict], **meta: Any) -> str:
    """Promote the parts that tasks wrote (reused ones are already in place), then write the
    manifest last and drop the parts' records; returns the manifest digest.

    Each file was hashed in this run by the task that wrote or reused it, so it is not hashed
    again here; one that has gone missing since is an IntegrityError."""
    for x in results:
        part = part_of(x["file"])
        if root.exists(part):
            try:
                root.promote(part, x["file"])
            except FileNotFoundError:
                pass  # a concurrent run promoted the same (identical) part first
        if not root.exists(x["file"]):
            raise IntegrityError(f"{root.uri(x['file'])}: gone before its folder was published")
    files = [{"name": posixpath.relpath(x["file"], folder), "bytes": x["bytes"], "sha256": x["sha256"]}
             for x in results]
    digest = root.write_manifest(folder, files, **meta)
    for x in results:
        with contextlib.suppress(OSError):
            root.remove(part_record(x["file"]))
    if root.local:
        with contextlib.suppress(OSError):
            os.rmdir(root.path(posixpath.join(folder, PARTS)))
    return digest
