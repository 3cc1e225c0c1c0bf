"""Safe extraction of untrusted dataset archives (tar, gzip/bzip2/xz tar, or zip).

Archives come from the internet, so every member is treated as hostile: only regular
files and directories are written, only inside a private temp folder, modes are never
honoured, caps are enforced on the bytes actually produced, and the result is
published with one rename so nobody ever sees half an extraction.
"""
from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import lzma
import os
import posixpath
import re
import secrets
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO, Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import ArchiveError

_CHUNK = 1 << 20
# Decompressed bytes tolerated beyond member data (headers, padding, read-ahead), so a
# bomb hidden in a pax header, a skipped member or trailing padding cannot run away.
_SLACK = 1 << 20
_PER_MEMBER_SLACK = 4096
_DRIVE = re.compile(r"^[A-Za-z]:")
# Decode failures of the archive; write-side OSErrors never pass through _guard.
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError,
                zipfile.BadZipFile, NotImplementedError)
_TAR_KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
              tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
              tarfile.FIFOTYPE: "FIFO", tarfile.GNUTYPE_SPARSE: "sparse file"}
_ZIP_KINDS = {stat.S_IFLNK: "symlink", stat.S_IFCHR: "character device",
              stat.S_IFBLK: "block device", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}


@dataclass(frozen=True)
class Caps:
    """Limits that bound the disk, inodes and time one archive may cost."""

    max_members: int = 2_000_000  # every entry counts: files, dirs and skipped junk
    max_total_bytes: int = 20 * 2**30  # sum of uncompressed member sizes
    max_member_bytes: int = 2**30


@dataclass(frozen=True)
class Member:
    """One extracted regular file, hashed as written so callers need not re-read it."""

    path: str  # POSIX relative path inside the extraction folder
    size: int
    sha256: str


def _guard(archive: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a reading function, reporting decode failures as one ArchiveError."""
    try:
        return fn(*args)
    except _READ_ERRORS as e:
        raise ArchiveError(f"{archive}: corrupt or truncated archive: {e}") from e


def _normalise(name: str) -> str:
    """Reduce a member name to a relative POSIX path, or say why it is unsafe."""
    if not name:
        raise ValueError("empty name")
    if "\0" in name:
        raise ValueError("NUL byte in name")
    if "\\" in name:
        raise ValueError("backslash in name")
    if name.startswith("/") or _DRIVE.match(name):
        raise ValueError("absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError("'..' component")
    return "/".join(parts)


class _Source:
    """The decompressed tar stream, with a byte budget and a record of trailing data."""

    def __init__(self, raw: IO[bytes], archive: str):
        self.raw, self.archive = raw, archive
        self.total = 0
        self.allowed = _SLACK
        self.data_end = 0  # offset just past the last non-zero byte seen

    def read(self, n: int) -> bytes:
        data = _guard(self.archive, self.raw.read, n)
        kept = len(data.rstrip(b"\0"))
        if kept:
            self.data_end = self.total + kept
        self.total += len(data)
        if self.total > self.allowed:
            raise ArchiveError(f"{self.archive}: decompresses to more than its members declare")
        return data


class _Writer:
    """Creates members under the temp root, enforcing caps and path rules."""

    def __init__(self, archive: str, root: str, caps: Caps):
        self.archive, self.root, self.caps = archive, root, caps
        self.count = self.total = 0
        self.seen: set[str] = set()
        self.members: list[Member] = []

    def refuse(self, name: str, why: str) -> ArchiveError:
        return ArchiveError(f"{self.archive}: member {name!r}: {why}")

    def admit(self, name: str, kind: str, size: int) -> str | None:
        """Check one entry and create it if a dir; return a file's path, else None."""
        self.count += 1
        if self.count > self.caps.max_members:
            raise self.refuse(name, f"archive has more than {self.caps.max_members} members")
        if kind not in ("file", "dir"):
            raise self.refuse(name, f"{kind}s are not allowed")
        try:
            path = _normalise(name)
        except ValueError as e:
            raise self.refuse(name, str(e)) from None
        if kind == "file":
            self.check(name, size, size)
        parts = path.split("/")
        if any(p == "__MACOSX" or p.startswith("._") for p in parts) or parts[-1] == ".DS_Store":
            self.total += size if kind == "file" else 0  # its bytes are still decompressed
            return None
        if not path and kind == "dir":
            return None
        if not path:
            raise self.refuse(name, "empty name")
        if path in self.seen:
            raise self.refuse(name, "duplicate member")
        self.seen.add(path)
        if kind == "dir":
            return self.mkdir(name, os.path.join(self.root, path))
        return path

    def check(self, name: str, size: int, more: int) -> None:
        """Refuse a member at `size` bytes, `more` of them not yet in the total."""
        if size > self.caps.max_member_bytes:
            raise self.refuse(name, f"{size}+ bytes is over the {self.caps.max_member_bytes}-byte member cap")
        if self.total + more > self.caps.max_total_bytes:
            raise self.refuse(name, f"archive holds more than {self.caps.max_total_bytes} bytes")

    def _create(self, name: str, make: Callable[[], Any]) -> Any:
        """Run a filesystem call, naming the member when it clashes with another."""
        try:
            return make()
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            raise self.refuse(name, "clashes with an earlier member") from None
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise self.refuse(name, "name too long") from None
            raise

    def mkdir(self, name: str, path: str) -> None:
        self._create(name, lambda: os.makedirs(path, 0o755, exist_ok=True))

    def file(self, name: str, path: str, read: Callable[[int], bytes]) -> None:
        """Copy one file, hashing and counting the bytes actually produced."""
        full = os.path.join(self.root, path)
        self.mkdir(name, os.path.dirname(full))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = self._create(name, lambda: os.open(full, flags, 0o644))
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            while chunk := read(_CHUNK):
                size += len(chunk)
                self.check(name, size, len(chunk))
                self.total += len(chunk)
                digest.update(chunk)
                out.write(chunk)
        self.members.append(Member(path, size, digest.hexdigest()))


def _tar(raw: IO[bytes], w: _Writer) -> None:
    """Stream a tar, then read to EOF so the compressor checks its CRC and length."""
    a = w.archive
    src = _Source(raw, a)
    with _guard(a, tarfile.open, None, "r|", src, 1 << 16) as tf:
        while (ti := _guard(a, tf.next)) is not None:
            kind = ("dir" if ti.isdir() else "file" if ti.isreg() and not ti.sparse
                    else _TAR_KINDS.get(ti.type, f"entries of type {ti.type!r}"))
            path = w.admit(ti.name, kind, ti.size)
            src.allowed += (ti.size if kind == "file" else 0) + _PER_MEMBER_SLACK
            if path is not None:
                f = _guard(a, tf.extractfile, ti)
                w.file(ti.name, path, lambda n: _guard(a, f.read, n))
        end = tf.offset  # where the end-of-archive marker must start
        while src.read(_CHUNK):
            pass
    # tarfile silently stops at a bad or missing header after the first member.
    if src.data_end > end or src.total < end + tarfile.BLOCKSIZE:
        raise ArchiveError(f"{a}: corrupt or truncated archive: bad or missing end-of-archive marker")


def _zip(raw: IO[bytes], w: _Writer) -> None:
    """Extract a zip; reading each member to its end makes zipfile check its CRC."""
    a = w.archive
    with _guard(a, zipfile.ZipFile, raw) as zf:
        # zipfile stops at the central directory's byte size, so a corrupt entry length can
        # swallow the entries after it: the end record's entry count must match.
        end = _guard(a, zipfile._EndRecData, raw)
        if end and len(zf.infolist()) != end[zipfile._ECD_ENTRIES_TOTAL]:
            raise ArchiveError(f"{a}: corrupt archive: the central directory lists {len(zf.infolist())} "
                               f"of its {end[zipfile._ECD_ENTRIES_TOTAL]} entries")
        for info in zf.infolist():
            ftype = stat.S_IFMT(info.external_attr >> 16)
            if ftype and ftype not in (stat.S_IFREG, stat.S_IFDIR):
                kind = _ZIP_KINDS.get(ftype, f"entries of mode {ftype:o}")
            elif info.flag_bits & 0x1:
                kind = "encrypted file"
            else:
                kind = "dir" if info.is_dir() else "file"
            path = w.admit(info.filename, kind, info.file_size)
            if path is not None:
                with _guard(a, zf.open, info) as f:
                    w.file(info.filename, path, lambda n: _guard(a, f.read, n))


def _decompressor(raw: IO[bytes], head: bytes, archive: str) -> IO[bytes]:
    """Pick the stream by magic bytes: names lie, and we own CRC checking."""
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    try:
        if head != bytes(tarfile.BLOCKSIZE):  # an all-zero block is an empty tar
            tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
        return raw
    except tarfile.HeaderError:
        raise ArchiveError(f"{archive}: not a tar, compressed tar or zip archive") from None


def _read(archive: str, w: _Writer) -> None:
    """Feed every member of a tar (any compression, chosen by magic bytes) or zip to `w`."""
    with open(archive, "rb") as raw:
        head = raw.read(tarfile.BLOCKSIZE)
        raw.seek(0)
        if head.startswith(b"PK\x03\x04"):
            _zip(raw, w)
        else:
            _tar(_decompressor(raw, head, archive), w)


def extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str], *,
            caps: Caps = Caps()) -> list[Member]:
    """Extract into `dest`, all or nothing; return the regular files sorted by path.

    If `dest` appears meanwhile (a concurrent run won), ours is discarded and the
    members are returned anyway so the caller can verify what is there.
    """
    archive, dest = os.fspath(archive), os.path.abspath(dest)
    tmp: str | None = f"{dest}.tmp-{secrets.token_hex(8)}"
    os.mkdir(tmp, 0o755)
    try:
        w = _Writer(archive, tmp, caps)
        _read(archive, w)
        if not os.path.lexists(dest):
            try:
                os.rename(tmp, dest)
                tmp = None
            except OSError:
                if not os.path.lexists(dest):
                    raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(w.members, key=lambda m: m.path)


BLOB = "members.bin"
INDEX = "members.parquet"


@dataclass(frozen=True)
class Packed:
    """What `pack` wrote: `files` members in BLOB, indexed by INDEX, plus every folder."""

    files: int
    bytes: int
    sha256: str  # of BLOB
    dirs: list[str]


class _Packer(_Writer):
    """Appends every member to one blob instead of creating a file each.

    Creating a file costs 0.35-0.7 ms on the disks measured here, 10x the decode of a small
    PNG, so a dataset of tiny images is stored as one sequential write plus an index.
    Folder/file clashes, which the filesystem catches for `extract`, are checked here.
    """

    def __init__(self, archive: str, out: IO[bytes], caps: Caps):
        super().__init__(archive, "", caps)
        self.out, self.offset, self.blob_hash = out, 0, hashlib.sha256()
        self.dirs: set[str] = set()
        self.files: set[str] = set()
        self.paths: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.digests: list[str] = []

    def mkdir(self, name: str, path: str) -> None:
        while path and path not in self.dirs:
            if path in self.files:
                raise self.refuse(name, "clashes with an earlier member")
            self.dirs.add(path)
            path = posixpath.dirname(path)

    def file(self, name: str, path: str, read: Callable[[int], bytes]) -> None:
        if path in self.dirs:
            raise self.refuse(name, "clashes with an earlier member")
        self.mkdir(name, posixpath.dirname(path))
        digest, size = hashlib.sha256(), 0
        while chunk := read(_CHUNK):
            size += len(chunk)
            self.check(name, size, len(chunk))
            self.total += len(chunk)
            digest.update(chunk)
            self.blob_hash.update(chunk)
            self.out.write(chunk)
        self.files.add(path)
        self.paths.append(path)
        self.offsets.append(self.offset)
        self.sizes.append(size)
        self.digests.append(digest.hexdigest())
        self.offset += size


def pack(archive: str | os.PathLike[str], folder: str | os.PathLike[str], *, caps: Caps = Caps()) -> Packed:
    """Read the archive with the same rules as `extract`, into `folder`/BLOB and `folder`/INDEX.

    The index (path, offset, size, sha256 per regular file, in archive order) is Parquet, so
    it is as queryable as the shards; `folder` is a staging folder its caller publishes.
    """
    archive, folder = os.fspath(archive), os.fspath(folder)
    with open(os.path.join(folder, BLOB), "wb", buffering=_CHUNK) as out:
        w = _Packer(archive, out, caps)
        _read(archive, w)
    table = pa.table({"path": pa.array(w.paths, pa.string()), "offset": pa.array(w.offsets, pa.int64()),
                      "size": pa.array(w.sizes, pa.int64()), "sha256": pa.array(w.digests, pa.string())})
    pq.write_table(table, os.path.join(folder, INDEX), compression="zstd")
    return Packed(files=len(w.paths), bytes=w.offset, sha256=w.blob_hash.hexdigest(), dirs=sorted(w.dirs))


def read_index(data: bytes) -> pa.Table:
    """The INDEX written by `pack`, from its bytes."""
    return pq.ParquetFile(pa.BufferReader(data)).read()  # read_table would import pyarrow.dataset: 1 s


def pack_folder(folder: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Tar an already-extracted folder deterministically, so it flows through the same
    verified, content-addressed path as a downloaded archive (and edits to the folder
    after the run cannot change what was converted).

    Only regular files and folders are taken; a symlink or special file is refused.
    """
    folder = os.fspath(folder)
    top = os.path.basename(os.path.normpath(folder)) or "data"
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for here, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
                full = os.path.join(here, name)
                rel = os.path.relpath(full, folder).replace(os.sep, "/")
                st = os.lstat(full)
                if not stat.S_ISREG(st.st_mode):
                    raise ArchiveError(f"{full}: not a regular file (symlinks and special files are refused)")
                info = tarfile.TarInfo(f"{top}/{rel}")
                info.size, info.mode, info.mtime = st.st_size, 0o644, 0
                with open(full, "rb") as f:
                    tf.addfile(info, f)
