"""Safe extraction of untrusted dataset archives (tar, gzip/bzip2/xz tar, or zip).

Archives come from the internet, so every member is treated as hostile: only regular
files and directories are written, only inside a private temp folder, modes are never
honoured, caps are enforced on the bytes actually produced, and the result is
published with one rename so nobody ever sees half an extraction.
"""
from __future__ import annotations

import bz2
import contextlib
import errno
import functools
import gzip
import hashlib
import lzma
import os
import posixpath
import queue
import re
import secrets
import shutil
import stat
import struct
import tarfile
import threading
import zipfile
import zlib
from array import array
from dataclasses import dataclass
from collections.abc import Iterator
from typing import IO, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pixelsim.storage.errors import ArchiveError, CorruptArchive
from pixelsim.storage.tables import numbers, strings

_CHUNK = 1 << 20
# Decompressed bytes tolerated beyond member data (headers, padding, read-ahead), so a
# bomb hidden in a pax header, a skipped member or trailing padding cannot run away.
_SLACK = 1 << 20
_SINK_PARTS = 4096   # small writes gathered into one block at most
_SINK_DEPTH = 8   # blocks (about _CHUNK each) or index tables waiting for the writer thread
_PER_MEMBER_SLACK = 4096
# Extended headers (pax records, long names) a member may bring on top of that: macOS tar
# stores extended attributes as a few KB of pax records per file. Beyond it, they count as
# bytes the members do not declare.
_PER_MEMBER_META = 64 << 10
_DRIVE = re.compile(r"^[A-Za-z]:")
# Decode failures of the archive; write-side OSErrors never pass through _guard.
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError,
                zipfile.BadZipFile, NotImplementedError)
_TAR_KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
              tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
              tarfile.FIFOTYPE: "FIFO", tarfile.GNUTYPE_SPARSE: "sparse file"}
_BLOCK = 512
_EXT_MAX = 1 << 20  # a long name or pax header this big is hostile, not metadata
_SUM_WINDOW = 64 << 10  # header checksums are summed this many bytes at a time, in numpy
_FILE_FLAGS = (b"0", b"\0", b"7")  # regular, pre-POSIX regular, contiguous
_EXT_FLAGS = (b"L", b"K", b"x", b"X", b"g")  # GNU long name/link, pax (X: Solaris), pax global
_NO_DATA_FLAGS = (b"1", b"2", b"3", b"4", b"5", b"6")  # tarfile's rule: others are followed by data
_SIGNED = struct.Struct("148b8x356b")  # historical signed checksum, checksum field skipped
_ZIP_KINDS = {stat.S_IFLNK: "symlink", stat.S_IFCHR: "character device",
              stat.S_IFBLK: "block device", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}


@dataclass(frozen=True)
class Caps:
    """Limits that bound the disk, inodes and time one archive may cost."""

    max_members: int = 2_000_000  # every entry counts: files, dirs and skipped junk
    max_total_bytes: int = 20 * 2**30  # sum of uncompressed member sizes
    max_member_bytes: int = 2**30
    max_depth: int = 32            # folders in one member's path: layout work and the manifest grow with it
    max_path_bytes: int = 1024     # one member's path, UTF-8


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
    except NotImplementedError as e:   # zipfile: a compression method it lacks (Deflate64, ...)
        raise ArchiveError(f"{archive}: uses a feature this reader does not support ({e}); repack it as "
                           "a plain zip (deflate) or a .tar.gz") from e
    except _READ_ERRORS as e:
        raise CorruptArchive(f"{archive}: corrupt or truncated archive: {e}") from e


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


def _number(field: bytes) -> int:
    """A tar number: octal padded with spaces/NULs, or GNU base-256 (first byte 0x80).

    Stricter than tarfile, whose int(s, 8) also takes signs, underscores and "0o".
    """
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        raise ValueError(f"negative number {bytes(field)!r}")
    z = field.find(0)
    digits = (field if z < 0 else field[:z]).strip()
    if not digits:
        return 0
    if not digits.isdigit():
        raise ValueError(f"invalid number {bytes(field)!r}")
    try:
        return int(digits, 8)
    except ValueError:
        raise ValueError(f"invalid number {bytes(field)!r}") from None


def _checksum_ok(block: bytes) -> bool:
    """Whether a 512-byte block is a tar header: its checksum matches (unsigned or signed)."""
    if len(block) != _BLOCK:
        return False
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    return stored in (sum(block) - sum(block[148:156]) + 256, sum(_SIGNED.unpack_from(block)) + 256)


def _text(raw: bytes) -> str:
    """A name field up to its first NUL, decoded as tarfile does (utf-8, surrogateescape)."""
    z = raw.find(0)
    return (raw if z < 0 else raw[:z]).decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """Parse pax records strictly: "%d %s=%s\n", the length counting the whole record."""
    records: dict[str, str] = {}
    pos, n = 0, len(data)
    while pos < n:
        if data[pos] == 0 and data.count(0, pos) == n - pos:
            break  # NUL padding
        sp = data.find(b" ", pos, pos + 21)
        digits = data[pos:sp] if sp > pos else b""
        if not digits.isdigit():
            raise ValueError(f"malformed pax record at byte {pos}")
        end = pos + int(digits)
        if end < sp + 4 or end > n or data[end - 1] != 0x0A:
            raise ValueError(f"pax record at byte {pos} has a bad length")
        key, eq, value = data[sp + 1:end - 1].partition(b"=")
        if not key or not eq:
            raise ValueError(f"malformed pax record at byte {pos}")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


_OCTAL = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_USTAR = np.frombuffer(b"ustar\0", np.uint8)


def _unsigned_sums(a: np.ndarray) -> np.ndarray:
    """Each 512-byte row's tar checksum: its bytes summed, the checksum field counted as spaces."""
    return a.sum(1, dtype=np.uint32).astype(np.int64) - a[:, 148:156].sum(1, dtype=np.int64) + 256   # uint32 holds 512 x 255 and sums faster


def _octal_digits(field: np.ndarray) -> np.ndarray:
    return ((field >= 0x30) & (field <= 0x37)).all(1)


def _size_fields(buf: bytes, pos: int) -> list[int]:
    """For each whole block from buf[pos], read as a regular file's header: its size (11 octal
    digits and a NUL), else -1. Only a block that `_plain_count` then accepts is a header."""
    n = (len(buf) - pos) >> 9
    a = np.frombuffer(buf, np.uint8, n << 9, pos).reshape(n, _BLOCK)
    size = a[:, 124:135]
    ok = (a[:, 156] == 0x30) & _octal_digits(size) & (a[:, 135] == 0)
    return np.where(ok, (size.astype(np.int64) - 0x30) @ _OCTAL, -1).tolist()


def _plain_count(buf: bytes, heads: list[int]) -> int:
    """How many of these headers, from the first, are plain: checksum written as "%06o\\0 " and
    right (unsigned), no ustar name prefix: what tarfile, GNU tar and libarchive write for a
    regular file with a short name. Only those blocks are summed, never the members' data."""
    off = heads[0] % _BLOCK   # every header is a whole number of blocks after the first
    blocks = np.frombuffer(buf, np.uint8, (len(buf) - off) // _BLOCK * _BLOCK, off).reshape(-1, _BLOCK)
    rows = blocks[(np.asarray(heads, np.int64) - off) // _BLOCK]
    chk = rows[:, 148:154]
    ok = (_octal_digits(chk) & (rows[:, 154] == 0) & (rows[:, 155] == 0x20)
          & ((rows[:, 345] == 0) | ~(rows[:, 257:263] == _USTAR).all(1)))
    ok &= (chk.astype(np.int64) - 0x30) @ _OCTAL[5:] == _unsigned_sums(rows)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else len(heads)


class _Source:
    """A strict streaming tar reader over the decompressed stream.

    tarfile's per-header parsing and stream buffering cost ~40 us a member, more than the
    member itself for datasets of tiny images. The stream is read in large chunks, under a
    byte budget (so a bomb in headers or padding cannot run away), recording where the last
    non-zero byte was (for the end-marker check after the loop).
    """

    def __init__(self, raw: IO[bytes], archive: str):
        self.raw, self.archive = raw, archive
        self.total = 0
        self.allowed = _SLACK
        self.data_end = 0  # offset just past the last non-zero byte seen
        self.buf, self.pos, self.base = b"", 0, 0  # buf[pos:] is unread; buf[0] is at offset base
        self.sums: list[int] = []  # unsigned checksums of the blocks from buf[sums_at], 512 apart
        self.sums_at = 0
        self.sizes: list[int] = []  # per block from buf[sizes_at]: its size if a plain header, else -1
        self.sizes_at = 0
        self.name, self.left, self.pad = "", 0, 0  # the current member and its unread data
        self.end = 0  # where the end-of-archive marker starts (or the stream stopped)

    def read(self, n: int) -> bytes:
        """Raw bytes, never reading more than one byte past the budget."""
        data = _guard(self.archive, self.raw.read, max(min(n, self.allowed - self.total), 1))
        kept = len(data.rstrip(b"\0"))
        if kept:
            self.data_end = self.total + kept
        self.total += len(data)
        if self.total > self.allowed:
            raise ArchiveError(f"{self.archive}: decompresses to more than its members declare")
        return data

    def corrupt(self, why: str) -> ArchiveError:
        return CorruptArchive(f"{self.archive}: corrupt or truncated archive: {why}")

    def fill(self, need: int) -> bool:
        """Make `need` unread bytes available; False if the stream ends first."""
        while len(self.buf) - self.pos < need:
            more = self.read(_CHUNK)
            if not more:
                return False
            self.base += self.pos
            self.buf, self.pos, self.sums, self.sizes = self.buf[self.pos:] + more, 0, [], []
        return True

    def skip(self, n: int) -> None:
        while n:
            avail = len(self.buf) - self.pos
            if avail >= n:
                self.pos += n
                return
            n -= avail
            self.pos = len(self.buf)
            if not self.fill(1):
                raise self.corrupt(f"member {self.name!r} is cut short at offset {self.base + self.pos}")

    def data(self, n: int) -> bytes:
        """The `read` handed to writers: up to `n` bytes of the current member, b"" at its end."""
        left = self.left
        if left <= 0 or n <= 0:
            return b""
        if self.pos >= len(self.buf) and not self.fill(1):
            raise self.corrupt(f"member {self.name!r} is cut short at offset {self.base + self.pos}")
        pos, buf = self.pos, self.buf
        k = min(n, left, len(buf) - pos)
        self.pos, self.left = pos + k, left - k
        return buf[pos:pos + k]

    def batch(self) -> tuple[list[str], list[int], list[int]]:
        """The plain members wholly in the buffer from here, their data and padding read: the
        name, data offset in `buf` and size of each ustar or V7 regular file whose header is
        written the usual way.

        Per-member Python is most of untar's time for datasets of tiny images, so these
        headers are found in one loop over sizes read for every block at once, then checked
        together. Anything else (extended headers, prefixes, other types, odd fields, a member
        cut by the buffer's end) ends the batch and goes through `next`, which checks it fully.
        """
        names: list[str] = []
        if self.left:
            return names, [], []
        buf, pos = self.buf, self.pos
        end = len(buf)
        if self.pad:
            if end - pos < self.pad:
                return names, [], []
            pos, self.pad = pos + self.pad, 0
        self.pos = pos
        if not 0 <= pos - self.sizes_at < len(self.sizes) << 9:
            self.sizes, self.sizes_at = _size_fields(buf, pos), pos
        sizes, at = self.sizes, self.sizes_at
        heads: list[int] = []
        lengths: list[int] = []
        while end - pos >= _BLOCK:
            size = sizes[(pos - at) >> 9]
            nxt = pos + _BLOCK + size + (-size % _BLOCK)
            if size < 0 or nxt > end:
                break
            heads.append(pos)
            lengths.append(size)
            pos = nxt
        if not heads:
            return names, [], []
        k = _plain_count(buf, heads)
        if k < len(heads):
            pos = heads[k]
            del heads[k:], lengths[k:]
        for h in heads:
            z = buf.find(0, h, h + 100)
            names.append(buf[h:z if z >= 0 else h + 100].decode("utf-8", "surrogateescape"))
        self.pos, self.allowed = pos, self.allowed + sum(lengths) + len(heads) * _PER_MEMBER_SLACK
        return names, [h + _BLOCK for h in heads], lengths

    def refill(self) -> bool:
        """Read on when the next header, or the small member it starts, is cut by the buffer's
        end, so that `batch` takes it rather than `next`; False when that gains nothing (the
        member fits already, is large, or the stream has ended): then `next` decides."""
        if self.left or self.pad:
            return False
        need, avail = _BLOCK, len(self.buf) - self.pos
        if avail >= _BLOCK:   # a whole block, so `batch` has read its size field (-1: not a plain header)
            at = self.pos - self.sizes_at
            size = self.sizes[at >> 9] if at % _BLOCK == 0 and 0 <= at >> 9 < len(self.sizes) else -1
            if size < 0:
                return False
            need += size + (-size % _BLOCK)
            if need > _CHUNK or avail >= need:
                return False
        # what the budget does not cover yet waits for `next`, which grants a member before reading it
        return need - avail <= self.allowed - self.total and self.fill(need)

    def _checksum(self, pos: int) -> int:
        """The unsigned checksum of the block at buf[pos], summed a window at a time."""
        i = (pos - self.sums_at) >> 9
        if not 0 <= i < len(self.sums):
            n = min(len(self.buf) - pos, _SUM_WINDOW) >> 9
            a = np.frombuffer(self.buf, np.uint8, n << 9, pos).reshape(n, _BLOCK)
            self.sums = _unsigned_sums(a).tolist()
            self.sums_at, i = pos, 0
        return self.sums[i]

    def _ext(self, size: int, off: int) -> bytes:
        """The data of an extended header (long name, pax records), padding skipped."""
        if size > _EXT_MAX:
            raise self.corrupt(f"extended header at offset {off} declares {size} bytes")
        want = size + (-size % _BLOCK)
        if not self.fill(want):
            raise self.corrupt(f"extended header at offset {off} is cut short")
        data = self.buf[self.pos:self.pos + size]
        self.pos += want
        return data

    def _at_end(self, ext_at: int, eof: bool) -> None:
        """At a zero block or the stream's end: no extended header may be pending, no header cut."""
        off = self.base + self.pos
        if ext_at >= 0:
            raise self.corrupt(f"extended header at offset {ext_at} is not followed by a member")
        if eof and self.buf.count(0, self.pos) != len(self.buf) - self.pos:
            raise self.corrupt(f"header at offset {off} is cut short")
        self.end = off  # a missing or partial marker, or data after it, fails the check after the loop

    def _bad_header(self, buf: bytes, pos: int, want: int, ext_at: int) -> bool:
        """Check a header failing the fast checksum test; True if it is the end marker."""
        chk = buf[pos + 148:pos + 156]
        if want == 256 and chk == b"\0" * 8:  # an all-zero block
            self._at_end(ext_at, eof=False)
            return True
        try:
            stored = _number(chk)
        except ValueError:
            stored = -1
        if stored != want and stored != sum(_SIGNED.unpack_from(buf, pos)) + 256:
            raise self.corrupt(f"bad header checksum at offset {self.base + pos}: "
                               "neither a tar header nor an end-of-archive marker")
        return False

    def next(self) -> tuple[str, str, int] | None:
        """Parse the next member's header(s): (name, kind, size), or None at the end marker.

        Like tarfile, an earlier long-name/pax header wins over a later one and over the
        ustar name; a pax "path" loses trailing slashes, a directory's name too.
        """
        n = self.left + self.pad  # the previous member's unread data and padding
        if n:
            self.left = self.pad = 0
            if len(self.buf) - self.pos >= n:
                self.pos += n
            else:
                self.skip(n)
        name: str | None = None
        size: int | None = None
        sparse, long_name, ext_at, meta = False, False, -1, 0
        while True:
            buf, pos = self.buf, self.pos
            if len(buf) - pos < _BLOCK:
                if not self.fill(_BLOCK):
                    self._at_end(ext_at, eof=True)
                    return None
                buf, pos = self.buf, self.pos
            i, sums = (pos - self.sums_at) >> 9, self.sums
            want = sums[i] if 0 <= i < len(sums) else self._checksum(pos)
            # "%06o\0 " is what tarfile, GNU tar and libarchive write; anything else is checked slowly.
            if buf[pos + 148:pos + 156] != b"%06o\0 " % want and self._bad_header(buf, pos, want, ext_at):
                return None
            flag = buf[pos + 156:pos + 157]
            field = buf[pos + 124:pos + 136]
            try:
                hsize = int(field[:11], 8) if field[11] == 0 and field[:11].isdigit() else _number(field)
            except ValueError:
                raise self.corrupt(f"header at offset {self.base + pos}: invalid size {field!r}") from None
            self.pos = pos + _BLOCK
            if flag in _EXT_FLAGS:
                off = self.base + pos
                ext_at = off if ext_at < 0 else ext_at
                grant = min(_BLOCK + hsize + (-hsize % _BLOCK), _PER_MEMBER_META - meta)
                meta += grant
                self.allowed += grant   # a member's metadata is budgeted, up to _PER_MEMBER_META
                data = self._ext(hsize, off)
                if flag == b"L":
                    if name is None:
                        name, long_name = _text(data), True
                elif flag != b"K":  # a long link name: links are refused anyway
                    path, psize, psparse = self._pax_header(data, flag == b"g", off)
                    if name is None and path is not None:
                        name = path.rstrip("/")
                    size = psize if size is None else size
                    sparse = sparse or psparse
                continue
            raw = buf[pos:pos + 100]
            z = raw.find(0)
            hname = (raw if z < 0 else raw[:z]).decode("utf-8", "surrogateescape")
            if flag == b"\0" and hname.endswith("/"):  # a pre-POSIX directory
                flag = b"5"
            if flag == b"5":
                hname = hname.rstrip("/")
            # POSIX ustar has a name prefix; GNU keeps other fields there, V7 nothing.
            if buf[pos + 345] and buf[pos + 257:pos + 263] == b"ustar\0":
                hname = f"{_text(buf[pos + 345:pos + 500])}/{hname}"
            if name is None:
                name = hname
            elif long_name and flag == b"5":
                name = name.removesuffix("/")
            if size is None:
                size = hsize
            if sparse:
                kind = "sparse file"
            elif flag in _FILE_FLAGS:
                kind = "file"
            elif flag == b"5":
                kind = "dir"
            else:
                kind = _TAR_KINDS.get(flag, f"entries of type {flag!r}")
            self.name = name
            if flag not in _NO_DATA_FLAGS:
                self.left, self.pad = size, -size % _BLOCK
            return name, kind, size

    def _pax_header(self, data: bytes, glob: bool, off: int) -> tuple[str | None, int | None, bool]:
        """A pax header's path, size and whether it describes a sparse file."""
        try:
            records = _pax(data)
        except ValueError as e:
            raise self.corrupt(f"pax header at offset {off}: {e}") from None
        sparse = any(k.startswith("GNU.sparse.") for k in records)
        if glob:
            for key in records:
                if key in ("path", "size") or key.startswith("GNU.sparse."):
                    # tarfile applies these to every later member: refuse rather than guess
                    raise ArchiveError(f"{self.archive}: global pax header at offset {off} "
                                       f"sets {key!r}, which is not supported")
            return None, None, False
        size = records.get("size")
        if size is not None:
            if not (size.isascii() and size.isdigit() and len(size) <= 30):
                raise self.corrupt(f"pax header at offset {off}: invalid size {size!r}")
            size = int(size)
        return records.get("path"), size, sparse


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
        if len(parts) > self.caps.max_depth:
            raise self.refuse(name, f"path is {len(parts)} levels deep, over the cap of {self.caps.max_depth}")
        if len(path.encode("utf-8", "surrogateescape")) > self.caps.max_path_bytes:
            raise self.refuse(name, f"path is longer than {self.caps.max_path_bytes} bytes")
        if any(p == "__MACOSX" or p.startswith("._") for p in parts) or parts[-1] == ".DS_Store":
            self.total += size if kind == "file" else 0  # its bytes are still decompressed
            return None
        if not path and kind == "dir":
            return None
        if not path:
            raise self.refuse(name, "empty name")
        self.remember(name, path, kind)
        if kind == "dir":
            return self.mkdir(name, os.path.join(self.root, path))
        return path

    def remember(self, name: str, path: str, kind: str) -> None:
        """Refuse a second member of the same (normalised) name."""
        if path in self.seen:
            raise self.refuse(name, "duplicate member")
        self.seen.add(path)

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

    def plains(self, buf: bytes, names: list[str], starts: list[int], sizes: list[int]) -> None:
        """Regular files whose bytes are all at hand: `names[i]` is `buf[starts[i]:][:sizes[i]]`."""
        view = memoryview(buf)
        for name, start, size in zip(names, starts, sizes):
            self.plain(name, view[start:start + size])

    def plain(self, name: str, data: memoryview) -> None:
        """One regular file whose bytes are all at hand, under the same rules as any other."""
        path = self.admit(name, "file", len(data))
        if path is not None:
            self.file(name, path, _reader(data))

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


def _reader(data: memoryview) -> Callable[[int], bytes]:
    """A `read(n)` over bytes already in memory, b"" at their end."""
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = data[pos:pos + n]
        pos += len(chunk)
        return chunk
    return read


def _tar(raw: IO[bytes], w: _Writer) -> None:
    """Stream a tar, then read to EOF so the compressor checks its CRC and length."""
    src = _Source(raw, w.archive)
    while True:
        names, starts, sizes = src.batch()
        if names:
            w.plains(src.buf, names, starts, sizes)
        if src.refill():
            continue
        if (member := src.next()) is None:
            break
        name, kind, size = member
        path = w.admit(name, kind, size)
        src.allowed += (size if kind == "file" else 0) + _PER_MEMBER_SLACK
        if path is not None:
            w.file(name, path, src.data)
    end = src.end  # where the end-of-archive marker must start
    while src.read(_CHUNK):
        pass
    # The marker is one whole zero block (tarfile's rule), and only zeros may follow it.
    if src.data_end > end or src.total < end + _BLOCK:
        raise CorruptArchive(f"{w.archive}: corrupt or truncated archive: bad or missing end-of-archive marker")


def _zip(raw: IO[bytes], w: _Writer) -> None:
    """Extract a zip; reading each member to its end makes zipfile check its CRC."""
    a = w.archive
    with _guard(a, zipfile.ZipFile, raw) as zf:
        # zipfile stops at the central directory's byte size, so a corrupt entry length can
        # swallow the entries after it: the end record's entry count must match.
        end = _guard(a, zipfile._EndRecData, raw)
        if end and len(zf.infolist()) != end[zipfile._ECD_ENTRIES_TOTAL]:
            raise CorruptArchive(f"{a}: corrupt archive: the central directory lists {len(zf.infolist())} "
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
    if head == bytes(_BLOCK) or _checksum_ok(head):  # an all-zero block is an empty tar
        return raw
    raise ArchiveError(f"{archive}: not a tar, compressed tar or zip archive")


def _read(archive: str, w: _Writer) -> None:
    """Feed every member of a tar (any compression, chosen by magic bytes) or zip to `w`."""
    with open(archive, "rb") as raw:
        head = raw.read(tarfile.BLOCKSIZE)
        raw.seek(0)
        if head.startswith(b"PK\x05\x06"):   # a zip's end record alone
            raise ArchiveError(f"{archive}: an empty zip archive (no members)")
        if head.startswith(b"PK\x03\x04") and not _checksum_ok(head):   # a tar member may be named PK..
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


INDEX_SCHEMA = pa.schema([("path", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
                          ("sha256", pa.string())])
INDEX_BATCH = 65_536   # index rows held in memory before they are written out as a row group
# Only members that can be images (storage.images.IMAGE_SUFFIXES) are stored in the blob; the
# others are indexed (path, size, sha256, offset -1) but their bytes, which no step reads, are
# not kept: a small archive of huge non-image members cannot fill the disk.
STORED_SUFFIXES = (".png", ".jpg", ".jpeg")


# A name holding any of these goes the general way (`_Writer.admit` decides): an empty, "." or
# ".." component, a backslash, a drive letter, junk (AppleDouble, __MACOSX, .DS_Store).
# (A component that starts with a dot, "." and ".." among them, is any "/." or NUL-dot.)
_NOT_PLAIN = ("\0/", "//", "/\0", "/.", "\0.", "\\", ":", "._", "__MACOSX", ".DS_Store")
_STORED_ENDS = tuple(f"{suffix}\0" for suffix in STORED_SUFFIXES)


@functools.lru_cache
def _too_deep(depth: int) -> re.Pattern[str]:
    """Finds a name (between NULs) of more than `depth` components."""
    return re.compile(f"\0(?:[^/\0]*/){{{depth}}}")


def _key(path: str) -> int:
    return hash(path)


class _Sink:
    """The blob's bytes and hash, and the index's row groups, written in order on a thread of
    their own: sha256 of large buffers, file writes and Parquet encoding release the GIL, so they
    overlap the reading thread's per-member Python. Small writes are gathered into blocks of
    about _CHUNK; at most _SINK_DEPTH blocks or tables wait, so memory stays bounded."""

    def __init__(self, out: IO[bytes], index_path: str):
        self.out, self.hash = out, hashlib.sha256()
        self.index = pq.ParquetWriter(index_path, INDEX_SCHEMA, compression="zstd")
        self.parts: list[bytes] = []
        self.held = 0
        self.queue: queue.Queue[bytes | pa.Table | None] = queue.Queue(_SINK_DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pixelsim-untar-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:   # after a failure the rest is only drained
                try:
                    if isinstance(item, pa.Table):
                        self.index.write_table(item)
                    else:
                        self.hash.update(item)
                        self.out.write(item)
                except BaseException as e:  # noqa: BLE001 - re-raised in the reading thread
                    self.error = e

    def _put(self, item: bytes | pa.Table | None) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def write(self, data: bytes | memoryview) -> None:
        """Append to the blob. A view is copied: holding it would keep its whole read buffer
        (1 MiB) alive for a few bytes of a member."""
        if not data:
            return
        self.parts.append(bytes(data) if isinstance(data, memoryview) else data)
        self.held += len(data)
        if self.held >= _CHUNK or len(self.parts) >= _SINK_PARTS:
            self._put(b"".join(self.parts) if len(self.parts) > 1 else self.parts[0])
            self.parts, self.held = [], 0

    def rows(self, table: pa.Table) -> None:
        self._put(table)

    def close(self) -> None:
        """Write what is gathered, wait for every write, close the index; raise the first error."""
        try:
            if self.parts:
                self._put(b"".join(self.parts))
                self.parts, self.held = [], 0
        finally:
            self.queue.put(None)
            self.thread.join()
            if self.index.is_open:
                self.index.close()
        if self.error is not None:
            raise self.error


class _Packer(_Writer):
    """Appends every member to one blob instead of creating a file each.

    Creating a file costs 0.35-0.7 ms on the disks measured here, 10x the decode of a small
    PNG, so a dataset of tiny images is stored as one sequential write plus an index.
    Folder/file clashes, which the filesystem catches for `extract`, are checked here.

    Memory stays flat in the number of members: index rows go to the Parquet file a batch at
    a time, and a file's name is remembered only as an 8-byte hash; duplicate files, and a
    folder named like an earlier file, are found from those hashes at the end (`finish`) and
    confirmed against the index's names, so a hash collision is never mistaken for one.
    """

    def __init__(self, archive: str, out: IO[bytes], index_path: str, caps: Caps):
        super().__init__(archive, "", caps)
        self.sink, self.offset = _Sink(out, index_path), 0
        self.dirs: set[str] = set()            # every folder, named or implied by a file's path
        self.named_dirs: set[str] = set()      # folders that are members themselves
        self.file_keys = array("q")
        self.files = 0
        self.index_path = index_path
        self.singles: tuple[list, list, list, list] = ([], [], [], [])   # rows added one by one
        self.chunks: list[pa.Table] = []    # rows added a batch at a time (and the batch before them)
        self.rows = 0                       # rows in both, not yet written

    def remember(self, name: str, path: str, kind: str) -> None:
        if path in self.named_dirs:
            raise self.refuse(name, "duplicate member")
        if kind == "dir":
            self.named_dirs.add(path)
        elif path in self.dirs:
            raise self.refuse(name, "clashes with an earlier member")

    def utf8(self, name: str, path: str) -> None:
        """The index stores names as UTF-8 text (as Parquet, pandas and DuckDB expect)."""
        try:
            path.encode()
        except UnicodeEncodeError:
            raise self.refuse(name, "name is not valid UTF-8") from None

    def mkdir(self, name: str, path: str) -> None:
        self.utf8(name, path)
        while path and path not in self.dirs:
            self.dirs.add(path)
            path = posixpath.dirname(path)

    def file(self, name: str, path: str, read: Callable[[int], bytes]) -> None:
        self.utf8(name, path)
        self.mkdir(name, posixpath.dirname(path))
        digest, size = hashlib.sha256(), 0
        store = path.lower().endswith(STORED_SUFFIXES)
        while chunk := read(_CHUNK):
            size += len(chunk)
            self.check(name, size, len(chunk))
            self.total += len(chunk)
            digest.update(chunk)
            if store:
                self.sink.write(chunk)
        self.index_row(path, size, store, digest.hexdigest())

    def index_row(self, path: str, size: int, store: bool, sha256: str) -> None:
        """Remember a stored (or only indexed) file: its key for `finish`, its row for the index."""
        self.file_keys.append(_key(path))
        paths, offsets, sizes, digests = self.singles
        paths.append(path)
        offsets.append(self.offset if store else -1)
        sizes.append(size)
        digests.append(sha256)
        self.files += 1
        self.rows += 1
        self.offset += size if store else 0
        if self.rows >= INDEX_BATCH:
            self.flush()

    def plain(self, name: str, data: memoryview) -> None:
        """`admit` and `file` for the usual member, in one call: a short ASCII path of plain
        components, under every cap, new, and no junk. Any other goes the general way."""
        size, caps = len(data), self.caps
        parts = name.split("/")
        if (not name.isascii() or "" in parts or "." in parts or ".." in parts or "\\" in name
                or name[1:2] == ":" or "._" in name or "__MACOSX" in name or name.endswith(".DS_Store")
                or len(parts) > caps.max_depth or len(name) > caps.max_path_bytes
                or self.count >= caps.max_members or size > caps.max_member_bytes
                or self.total + size > caps.max_total_bytes or name in self.dirs or name in self.named_dirs):
            return super().plain(name, data)
        self.count += 1
        self.total += size
        folder = name.rpartition("/")[0]
        if folder not in self.dirs:
            self.mkdir(name, folder)
        store = name.lower().endswith(STORED_SUFFIXES)
        if store:
            self.sink.write(data)
        self.index_row(name, size, store, hashlib.sha256(data).hexdigest())

    def plains(self, buf: bytes, names: list[str], starts: list[int], sizes: list[int]) -> None:
        """`plain` for a batch of the usual members at once: short ASCII paths of plain
        components, under every cap, no junk, every one an image (stored). The checks run once
        over the names joined by NULs (which no name holds); the bytes go to the blob in one
        write; the index gets the batch as Arrow columns. Any doubt sends the whole batch the
        general way, member by member, which decides."""
        caps, k = self.caps, len(names)
        joined = "\0" + "\0".join(names) + "\0"
        longest = max(map(len, names))
        if (not joined.isascii() or any(bad in joined for bad in _NOT_PLAIN) or min(map(len, names)) == 0
                or longest > caps.max_path_bytes
                or (longest >= 2 * caps.max_depth and _too_deep(caps.max_depth).search(joined))   # else too short
                or self.count + k > caps.max_members or max(sizes) > caps.max_member_bytes
                or self.total + sum(sizes) > caps.max_total_bytes
                or sum(map(joined.lower().count, _STORED_ENDS)) != k):
            return super().plains(buf, names, starts, sizes)
        folders: set[str] = set()   # the batch's new folders, ancestors included
        for folder in {n.rpartition("/")[0] for n in names} - self.dirs:
            while folder and folder not in self.dirs and folder not in folders:
                folders.add(folder)
                folder = folder.rpartition("/")[0]
        if not (self.dirs.isdisjoint(names) and self.named_dirs.isdisjoint(names) and folders.isdisjoint(names)):
            return super().plains(buf, names, starts, sizes)   # a file named like a folder: refused in order
        self.dirs |= folders
        view = memoryview(buf)
        datas = [view[start:start + size] for start, size in zip(starts, sizes)]
        digests = b"".join([hashlib.sha256(d).digest() for d in datas]).hex().encode()
        blob = b"".join(datas)
        self.sink.write(blob)
        lengths = np.fromiter(sizes, np.int64, k)
        offsets = np.empty(k, np.int64)
        offsets[0] = self.offset
        np.cumsum(lengths[:-1], out=offsets[1:])
        offsets[1:] += self.offset
        self.pending()
        self.chunks.append(pa.table([strings(names), numbers(offsets), numbers(lengths), strings(digests, 64)],
                                    schema=INDEX_SCHEMA))
        self.rows += k
        self.file_keys.extend(map(_key, names))
        self.count += k
        self.total += len(blob)
        self.files += k
        self.offset += len(blob)
        if self.rows >= INDEX_BATCH:
            self.flush()

    def pending(self) -> None:
        """The rows `index_row` gathered one by one, as a chunk (before a batch's, in order)."""
        paths, offsets, sizes, digests = self.singles
        if paths:
            self.chunks.append(pa.table([strings(paths), numbers(offsets), numbers(sizes),
                                         strings("".join(digests).encode(), 64)], schema=INDEX_SCHEMA))
            self.singles = ([], [], [], [])

    def flush(self) -> None:
        self.pending()
        if self.chunks:
            self.sink.rows(pa.concat_tables(self.chunks))
            self.chunks, self.rows = [], 0

    def finish(self) -> None:
        """Write the last rows, then refuse a file named twice, or a folder named like a file."""
        self.flush()
        self.sink.close()
        keys = np.frombuffer(self.file_keys, np.int64)   # sorted in place: no copy the size of the archive
        keys.sort()
        folders = np.array([_key(d) for d in self.dirs], np.int64)
        suspects = set(keys[1:][keys[1:] == keys[:-1]].tolist())   # named twice
        if len(keys):   # a folder named like a file
            at = np.minimum(np.searchsorted(keys, folders), len(keys) - 1)
            suspects |= set(folders[keys[at] == folders].tolist())
        if not suspects:
            return
        seen: set[str] = set()
        for path in pq.read_table(self.index_path, columns=["path"]).column("path").to_pylist():
            if _key(path) not in suspects:
                continue
            if path in seen or path in self.named_dirs:
                raise self.refuse(path, "duplicate member")
            if path in self.dirs:
                raise self.refuse(path, "clashes with an earlier member")
            seen.add(path)


def pack(archive: str | os.PathLike[str], folder: str | os.PathLike[str], *, caps: Caps = Caps()) -> Packed:
    """Read the archive with the same rules as `extract`, into `folder`/BLOB and `folder`/INDEX.

    The index (path, offset, size, sha256 per regular file, in archive order) is Parquet, so
    it is as queryable as the shards; `folder` is a staging folder its caller publishes.
    """
    archive, folder = os.fspath(archive), os.fspath(folder)
    try:
        with open(os.path.join(folder, BLOB), "wb", buffering=_CHUNK) as out:
            w = _Packer(archive, out, os.path.join(folder, INDEX), caps)
            try:
                _read(archive, w)
                w.finish()
            finally:
                if w.sink.thread.is_alive():   # the read failed: stop the writer, keep the read's error
                    with contextlib.suppress(BaseException):
                        w.sink.close()
    except OSError as e:   # read errors became ArchiveErrors in _guard: this is the writing side
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), folder) from e
    return Packed(files=w.files, bytes=w.offset, sha256=w.sink.hash.hexdigest(), dirs=sorted(w.dirs))


def read_index(data: bytes | IO[bytes], columns: list[str] | None = None) -> pa.Table:
    """The INDEX written by `pack` (or these columns of it), from its bytes or an open file."""
    source = pa.BufferReader(data) if isinstance(data, bytes) else data
    return pq.ParquetFile(source).read(columns=columns)  # read_table would import pyarrow.dataset: 1 s


def folder_files(folder: str, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, str, os.stat_result]]:
    """(path relative to `folder`, full path, lstat) of every entry to take from a folder
    source, in a fixed order; folders in `skip` (real paths: the storage root when it lies
    inside the source) are left out, so a root never packs or fingerprints itself."""
    skipped = {os.path.realpath(p) for p in skip}
    def unreadable(e: OSError) -> None:   # a folder skipped without a word would drop its images
        raise OSError(e.errno, f"cannot list a folder of the source ({e.strerror})", e.filename) from None

    for here, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(here, d)) not in skipped
                         or os.path.islink(os.path.join(here, d)))
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
            full = os.path.join(here, name)
            yield os.path.relpath(full, folder).replace(os.sep, "/"), full, os.lstat(full)


def pack_folder(folder: str | os.PathLike, dest: str | os.PathLike, skip: tuple[str, ...] = (), *,
                caps: Caps = Caps(), max_bytes: int | None = None) -> None:
    """Tar an already-extracted folder deterministically, so it flows through the same
    verified, content-addressed path as a downloaded archive (and edits to the folder
    after the run cannot change what was converted).

    Only regular files and folders are taken; a symlink or special file is refused. The
    archive caps (and `max_bytes`, the tar's size) hold before a file is written, not after
    the copy: a folder with a huge file in it costs a stat, not its size on disk twice.
    """
    folder = os.fspath(folder)
    top = os.path.basename(os.path.normpath(folder)) or "data"
    limit = min(caps.max_total_bytes, max_bytes) if max_bytes is not None else caps.max_total_bytes
    total = count = 0
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for rel, full, st in folder_files(folder, skip):
            if not stat.S_ISREG(st.st_mode):
                raise ArchiveError(f"{full}: not a regular file (symlinks and special files are refused)")
            count, total = count + 1, total + -(-st.st_size // 512) * 512 + 3 * 512   # data, header, pax header
            if st.st_size > caps.max_member_bytes:
                raise ArchiveError(f"{full}: {st.st_size} bytes is over the {caps.max_member_bytes}-byte member cap "
                                   "of a source: move it out of the folder")
            if total > limit or count > caps.max_members:
                raise ArchiveError(f"{folder}: a folder source of more than {limit} bytes or {caps.max_members} "
                                   f"files (at {full}): the ceiling of an unpinned source is $PIXELSIM_MAX_DOWNLOAD_BYTES")
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size, info.mode, info.mtime = st.st_size, 0o644, 0
            with open(full, "rb") as f:
                tf.addfile(info, f)
