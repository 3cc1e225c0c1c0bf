"""Tests for storage.archive: archives are built by hand, then extracted or refused."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
import tarfile
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from pixelsim.storage.archive import BLOB as PACK_BLOB
from pixelsim.storage.archive import (
    INDEX,
    Caps,
    Member,
    _normalise,
    _number,
    _pax,
    extract,
    pack,
    read_index,
)
from pixelsim.storage.errors import ArchiveError, CorruptArchive

MNIST_TINY = Path(__file__).parent / "data" / "mnist_tiny.tgz"
UMASK = os.umask(0)
os.umask(UMASK)
BLOB = bytes(range(256)) * 12  # 3072 bytes, not a multiple of the tar block
FILES = {"ds/a.txt": b"alpha\n", "ds/sub/b.bin": BLOB, "ds/sub/deep/empty": b""}
DIRS = ["ds", "ds/sub", "ds/sub/deep"]


def tinfo(name: str, data: bytes | None = None, **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    """A tar entry: a file when data is given, else whatever `type` says (default dir)."""
    ti = tarfile.TarInfo(name)
    ti.mtime = 1_600_000_000
    if data is not None:
        ti.size = len(data)
        ti.mode = 0o644
    else:
        ti.type = tarfile.DIRTYPE
        ti.mode = 0o755
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti, data


def write_tar(path: Path, entries, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def write_zip(path: Path, entries) -> Path:
    """entries: (name or ZipInfo, bytes); duplicate names are written on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return path


def normal_entries():
    return [tinfo(d) for d in DIRS[:2]] + [tinfo(n, b) for n, b in FILES.items()]


def expected_members() -> list[Member]:
    return [Member(n, len(b), hashlib.sha256(b).hexdigest()) for n, b in sorted(FILES.items())]


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Everything under root (not root itself, whose mtime a temp sibling must touch)."""
    out = {}
    for p in root.rglob("*"):
        st = p.lstat()
        body = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, st.st_size, body)
    return out


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    p = tmp_path / "outside.txt"
    p.write_bytes(b"do not touch\n")
    os.utime(p, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    return p


def assert_refused(tmp_path: Path, archive: Path, match: str, caps: Caps = Caps()) -> ArchiveError:
    """Extraction fails, and nothing but tmp_path's own mtime changed."""
    dest = tmp_path / "ds_out"
    before = snapshot(tmp_path)
    with pytest.raises(ArchiveError, match=match) as err:
        extract(str(archive), str(dest), caps=caps)
    assert not dest.exists()
    assert list(tmp_path.glob("*.tmp-*")) == []
    assert snapshot(tmp_path) == before
    assert (tmp_path / "outside.txt").read_bytes() == b"do not touch\n"
    assert (tmp_path / "outside.txt").stat().st_mtime_ns == 1_500_000_000_000_000_000
    with tempfile.TemporaryDirectory() as packed, pytest.raises(ArchiveError, match=match):
        pack(str(archive), packed, caps=caps)  # the untar step's way refuses the same, as well
    return err.value


def assert_extracted(dest: Path, members: list[Member]) -> None:
    assert members == expected_members()
    for name, body in FILES.items():
        p = dest / name
        assert p.read_bytes() == body
        assert stat.S_IMODE(p.stat().st_mode) == 0o644 & ~UMASK
    for d in DIRS:
        assert stat.S_IMODE((dest / d).stat().st_mode) == 0o755 & ~UMASK
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(FILES)
    assert list(dest.parent.glob("*.tmp-*")) == []


# --- happy paths -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["w:gz", "w", "w:bz2", "w:xz"])
def test_tar_formats_extract_exact_members(tmp_path: Path, mode: str) -> None:
    archive = write_tar(tmp_path / "in.bin", normal_entries(), mode)
    dest = tmp_path / "out"
    assert_extracted(dest, extract(str(archive), str(dest)))


def test_zip_extracts_exact_members(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "in.zip", [("ds/", b"")] + list(FILES.items()))
    dest = tmp_path / "out"
    assert_extracted(dest, extract(archive, dest))


def test_format_is_sniffed_not_taken_from_the_name(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "looks_like.zip", normal_entries(), "w:gz")
    assert extract(archive, tmp_path / "out") == expected_members()


def test_dot_entries_and_junk_are_skipped(tmp_path: Path) -> None:
    entries = [tinfo("."), tinfo("./ds"), tinfo("./ds/a.txt", b"x"), tinfo("./ds/._a.txt", b"junk"),
               tinfo("__MACOSX/ds/._a.txt", b"junk"), tinfo("ds/.DS_Store", b"junk")]
    dest = tmp_path / "out"
    members = extract(write_tar(tmp_path / "in.tgz", entries), dest)
    assert members == [Member("ds/a.txt", 1, hashlib.sha256(b"x").hexdigest())]
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["ds", "ds/a.txt"]


def test_zip_macos_junk_is_skipped(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "in.zip", [("ds/a.txt", b"x"), ("__MACOSX/ds/._a.txt", b"j"),
                                              ("ds/._a.txt", b"j")])
    dest = tmp_path / "out"
    assert [m.path for m in extract(archive, dest)] == ["ds/a.txt"]
    assert not (dest / "__MACOSX").exists() and not (dest / "ds/._a.txt").exists()


def test_setuid_and_sticky_modes_are_dropped_not_refused(tmp_path: Path) -> None:
    entries = [tinfo("ds", mode=0o1777), tinfo("ds/run", b"#!/bin/sh\n", mode=0o6755, uid=0, gid=0)]
    dest = tmp_path / "out"
    extract(write_tar(tmp_path / "in.tgz", entries), dest)
    assert stat.S_IMODE((dest / "ds/run").stat().st_mode) == 0o644 & ~UMASK
    assert stat.S_IMODE((dest / "ds").stat().st_mode) == 0o755 & ~UMASK


def test_existing_dest_wins_and_is_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "theirs.txt").write_bytes(b"first run")
    members = extract(write_tar(tmp_path / "in.tgz", normal_entries()), dest)
    assert members == expected_members()
    assert [p.name for p in dest.iterdir()] == ["theirs.txt"]
    assert list(tmp_path.glob("*.tmp-*")) == []


def test_caps_at_exact_limit_pass(tmp_path: Path) -> None:
    entries = [tinfo(f"ds/{i}", b"x" * 100) for i in range(3)]
    archive = write_tar(tmp_path / "in.tgz", entries)
    caps = Caps(max_members=3, max_total_bytes=300, max_member_bytes=100)
    assert len(extract(archive, tmp_path / "out", caps=caps)) == 3


def test_mnist_tiny_real_archive(tmp_path: Path) -> None:
    dest = tmp_path / "mnist"
    members = extract(MNIST_TINY, dest)
    assert len(members) > 1400
    assert all(m.path.startswith("mnist_tiny/") for m in members)
    assert [m.path for m in members] == sorted(m.path for m in members)
    assert any(m.path.startswith("mnist_tiny/train/3/") and m.path.endswith(".png") for m in members)
    labels = next(m for m in members if m.path == "mnist_tiny/labels.csv")
    body = (dest / labels.path).read_bytes()
    assert labels.size == len(body) and labels.sha256 == hashlib.sha256(body).hexdigest()


# --- refusals ----------------------------------------------------------------

def _special(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    ti, _ = tinfo(name, type=type_, linkname=linkname, mode=0o777)
    return ti, None


UNSAFE_TAR = {
    "dotdot": ([tinfo("../evil", b"x")], r"'\.\./evil'.*'\.\.' component"),
    "dotdot_inner": ([tinfo("ds/../../evil", b"x")], r"'\.\.' component"),
    "absolute": ([tinfo("ABS", b"x")], "absolute path"),
    "drive_letter": ([tinfo("C:/evil", b"x")], "absolute path"),
    "drive_relative": ([tinfo("C:evil", b"x")], "absolute path"),
    "backslash": ([tinfo("ds\\..\\..\\evil", b"x")], "backslash"),
    "empty_name": ([tinfo("", b"x")], "empty name"),
    "symlink_inside": ([_special("ds/link", tarfile.SYMTYPE, "a.txt")], "'ds/link'.*symlinks are not allowed"),
    "symlink_outside": ([_special("ds/link", tarfile.SYMTYPE, "../../outside.txt")], "symlinks"),
    "hardlink_inside": ([_special("ds/hl", tarfile.LNKTYPE, "ds/a.txt")], "hardlinks are not allowed"),
    "hardlink_outside": ([_special("ds/hl", tarfile.LNKTYPE, "OUTSIDE")], "hardlinks"),
    "fifo": ([_special("ds/fifo", tarfile.FIFOTYPE)], "FIFOs are not allowed"),
    "char_device": ([_special("ds/null", tarfile.CHRTYPE)], "character devices are not allowed"),
    "block_device": ([_special("ds/sda", tarfile.BLKTYPE)], "block devices are not allowed"),
    "dup_file": ([tinfo("ds/b.txt", b"1"), tinfo("ds/b.txt", b"2")], "'ds/b.txt'.*duplicate"),
    "dup_normalised": ([tinfo("ds/b.txt", b"1"), tinfo("./ds//b.txt", b"2")], "duplicate"),
    "file_then_dir": ([tinfo("ds/b", b"1"), tinfo("ds/b")], "duplicate"),
    "dir_then_file": ([tinfo("ds/b"), tinfo("ds/b", b"1")], "duplicate"),
    "file_as_parent": ([tinfo("ds/b", b"1"), tinfo("ds/b/c", b"2")], "clashes"),
    "implicit_dir_then_file": ([tinfo("ds/b/c", b"2"), tinfo("ds/b", b"1")], "clashes"),
}


@pytest.mark.parametrize("case", UNSAFE_TAR)
def test_unsafe_tar_members_are_refused(tmp_path: Path, sentinel: Path, case: str) -> None:
    entries, match = UNSAFE_TAR[case]
    fixed = []
    for ti, data in entries:  # absolute paths must point into tmp_path so a leak would show
        ti.name = ti.name.replace("ABS", str(tmp_path / "abs_evil.txt"))
        ti.linkname = ti.linkname.replace("OUTSIDE", str(sentinel))
        fixed.append((ti, data))
    # A good member first, so the temp folder is non-empty when the refusal comes.
    archive = write_tar(tmp_path / "in.tgz", [tinfo("ds/a.txt", b"ok")] + fixed)
    assert_refused(tmp_path, archive, match)
    assert not (tmp_path / "abs_evil.txt").exists() and not (tmp_path / "evil").exists()


@pytest.mark.parametrize("name", ["", "a\0b", "/x", "\\x", "a\\b", "C:x", "../x", "a/../../x"])
def test_normalise_rejects(name: str) -> None:
    with pytest.raises(ValueError):
        _normalise(name)


def test_normalise_folds_dots_and_slashes() -> None:
    assert _normalise("./a//b/./c/") == "a/b/c"
    assert _normalise("./") == ""


def _zip_with(tmp_path: Path, info: zipfile.ZipInfo, data: bytes) -> Path:
    path = tmp_path / "in.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ds/a.txt", b"ok")
        zf.writestr(info, data)
    return path


def test_zip_symlink_is_refused(tmp_path: Path, sentinel: Path) -> None:
    info = zipfile.ZipInfo("ds/link")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    assert_refused(tmp_path, _zip_with(tmp_path, info, b"../../outside.txt"), "'ds/link'.*symlinks")


def test_zip_dotdot_is_refused(tmp_path: Path, sentinel: Path) -> None:
    assert_refused(tmp_path, _zip_with(tmp_path, zipfile.ZipInfo("../evil"), b"x"), "'\\.\\.' component")


def test_zip_duplicate_is_refused(tmp_path: Path, sentinel: Path) -> None:
    archive = write_zip(tmp_path / "in.zip", [("ds/a.txt", b"1"), ("ds/a.txt", b"2")])
    assert_refused(tmp_path, archive, "duplicate")


def test_zip_encrypted_member_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = write_zip(tmp_path / "in.zip", [("ds/a.txt", b"secret")])
    raw = bytearray(path.read_bytes())
    raw[6] |= 1  # general purpose flag, local header
    central = raw.index(b"PK\x01\x02")
    raw[central + 8] |= 1  # and in the central directory
    path.write_bytes(bytes(raw))
    assert_refused(tmp_path, path, "encrypted")


def test_zip_bad_crc_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = tmp_path / "in.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("ds/a.txt", b"hello world " * 100)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"hello world") + 500] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert_refused(tmp_path, path, "corrupt or truncated.*CRC")


def _big_tgz(tmp_path: Path) -> Path:
    text = b"".join(b"line %d of a compressible payload\n" % i for i in range(20000))
    return write_tar(tmp_path / "in.tgz", [tinfo("ds/big.txt", text), tinfo("ds/a.txt", b"x")])


def test_truncated_tgz_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = _big_tgz(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_refused(tmp_path, path, "corrupt or truncated")


def test_flipped_byte_in_gzip_payload_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = _big_tgz(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert_refused(tmp_path, path, "corrupt or truncated")


def test_bad_gzip_crc_alone_is_caught_by_draining(tmp_path: Path, sentinel: Path) -> None:
    # Only the CRC trailer is wrong: every tar member decodes fine, so only reading the
    # compressed stream to its end can notice.
    path = _big_tgz(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert_refused(tmp_path, path, "corrupt or truncated.*CRC")


def test_bad_gzip_crc_past_tarfile_read_ahead_is_caught(tmp_path: Path, sentinel: Path) -> None:
    # 256 KiB of zero padding after the end marker: tarfile never reads that far, so
    # without draining the stream the CRC would never be checked.
    path = _zeros_tgz(tmp_path / "in.tgz", "ds/small", 10, tail=256 * 2**10)
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert_refused(tmp_path, path, "corrupt or truncated.*CRC")


def test_plain_tar_truncated_at_a_member_boundary_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = write_tar(tmp_path / "in.tar", [tinfo("ds/a.txt", b"x" * 512), tinfo("ds/b.txt", b"y")], "w")
    path.write_bytes(path.read_bytes()[:1024])  # first header + data, no end marker
    assert_refused(tmp_path, path, "end-of-archive marker")


def test_plain_tar_cut_mid_member_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = write_tar(tmp_path / "in.tar", [tinfo("ds/a.txt", BLOB)], "w")
    path.write_bytes(path.read_bytes()[:1500])
    assert_refused(tmp_path, path, "corrupt or truncated")


def test_garbage_after_tar_end_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = write_tar(tmp_path / "in.tar", [tinfo("ds/a.txt", b"x")], "w")
    path.write_bytes(path.read_bytes()[:1024] + b"\xff" * 512 + bytes(8192))
    assert_refused(tmp_path, path, "end-of-archive marker")


def _zeros_tgz(path: Path, name: str, size: int, tail: int = 0) -> Path:
    """A tgz holding `size` zero bytes in one member, then `tail` zeros of padding."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        ti = tarfile.TarInfo(name)
        ti.size = size
        gz.write(ti.tobuf(tarfile.PAX_FORMAT))
        chunk = bytes(1 << 20)
        for _ in range(size // len(chunk)):
            gz.write(chunk)
        gz.write(bytes(size % len(chunk) + (-size) % 512 + 1024))
        while tail > 0:
            gz.write(chunk[:tail])
            tail -= len(chunk)
    return path


def test_gzip_bomb_member_is_stopped_quickly(tmp_path: Path, sentinel: Path) -> None:
    path = _zeros_tgz(tmp_path / "bomb.tgz", "ds/zeros", 50 * 2**20)
    start = time.monotonic()
    assert_refused(tmp_path, path, "'ds/zeros'.*member cap", Caps(max_member_bytes=2**20))
    assert time.monotonic() - start < 2


def test_gzip_bomb_in_trailing_padding_is_stopped(tmp_path: Path, sentinel: Path) -> None:
    path = _zeros_tgz(tmp_path / "bomb.tgz", "ds/small", 10, tail=50 * 2**20)
    assert_refused(tmp_path, path, "decompresses to more than")


def test_max_members_cap(tmp_path: Path, sentinel: Path) -> None:
    archive = write_tar(tmp_path / "in.tgz", [tinfo(f"ds/{i}", b"x") for i in range(5)])
    assert_refused(tmp_path, archive, "more than 4 members", Caps(max_members=4))


def test_max_total_bytes_cap(tmp_path: Path, sentinel: Path) -> None:
    archive = write_tar(tmp_path / "in.tgz", [tinfo(f"ds/{i}", b"x" * 100) for i in range(3)])
    assert_refused(tmp_path, archive, "'ds/2'.*more than 299 bytes", Caps(max_total_bytes=299))


def test_max_member_bytes_cap(tmp_path: Path, sentinel: Path) -> None:
    archive = write_tar(tmp_path / "in.tgz", [tinfo("ds/a", b"x" * 100)])
    assert_refused(tmp_path, archive, "member cap", Caps(max_member_bytes=99))


@pytest.mark.parametrize("body", [b"just some notes\n" * 100, b""])
def test_non_archive_is_refused_by_name(tmp_path: Path, sentinel: Path, body: bytes) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(body)
    err = assert_refused(tmp_path, path, "not a tar")
    assert str(path) in str(err)


def test_an_empty_zip_is_named_as_one(tmp_path: Path, sentinel: Path) -> None:
    path = tmp_path / "empty.zip"
    path.write_bytes(b"PK\x05\x06" + bytes(18))
    assert str(path) in str(assert_refused(tmp_path, path, "an empty zip archive"))


def test_a_tar_whose_first_member_is_named_like_a_zip_header_is_read_as_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "pk.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("PK\x03\x04.png", b"one"), ("b.png", b"two")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert [m.path for m in extract(path, tmp_path / "out")] == ["PK\x03\x04.png", "b.png"]


def test_gzipped_non_tar_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = tmp_path / "notes.gz"
    path.write_bytes(gzip.compress(b"not a tar at all\n" * 1000))
    err = assert_refused(tmp_path, path, "corrupt or truncated")
    assert str(path) in str(err)


# --- more refusals (fault model: docs/RELIABILITY.md) -------------------------

def test_zip_absolute_member_is_refused(tmp_path: Path, sentinel: Path) -> None:
    info = zipfile.ZipInfo(str(tmp_path / "abs_evil.txt"))
    assert_refused(tmp_path, _zip_with(tmp_path, info, b"x"), "absolute path")
    assert not (tmp_path / "abs_evil.txt").exists()


@pytest.mark.parametrize(("mode", "kind"), [(stat.S_IFIFO, "FIFOs"), (stat.S_IFCHR, "character devices"),
                                            (stat.S_IFBLK, "block devices"), (stat.S_IFSOCK, "sockets")])
def test_zip_special_files_are_refused(tmp_path: Path, sentinel: Path, mode: int, kind: str) -> None:
    info = zipfile.ZipInfo("ds/special")
    info.create_system = 3
    info.external_attr = (mode | 0o644) << 16
    assert_refused(tmp_path, _zip_with(tmp_path, info, b""), f"'ds/special'.*{kind} are not allowed")


def test_zip_setuid_mode_is_dropped(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("ds/run")
    info.create_system = 3
    info.external_attr = (stat.S_IFREG | 0o6755) << 16
    dest = tmp_path / "out"
    extract(_zip_with(tmp_path, info, b"#!/bin/sh\n"), dest)
    assert stat.S_IMODE((dest / "ds/run").stat().st_mode) == 0o644 & ~UMASK


def test_untar_step_publishes_nothing_when_a_member_is_refused(tmp_path: Path, sentinel: Path) -> None:
    from pixelsim.tasks.contracts import Archive
    from pixelsim.tasks.untar import untar_archive

    archive = write_tar(tmp_path / "in.tgz", [tinfo("ds/a.txt", b"ok"),
                                              _special("ds/link", tarfile.SYMTYPE, "../../outside.txt")])
    root = tmp_path / "root"
    desc = Archive(root=str(root), dir="", digest="", file="in.tgz", sha256="ab" * 32)
    root.mkdir()
    os.replace(archive, root / "in.tgz")
    with pytest.raises(ArchiveError, match="'ds/link'.*symlinks"):
        untar_archive(desc)
    # nothing but the (released) step locks' folder beside the input
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["_locks", "extracted", "in.tgz"]
    assert (tmp_path / "outside.txt").read_bytes() == b"do not touch\n"


# --- the streaming tar reader: differential against tarfile, and hostile headers --------

BIG = os.urandom(1 << 20) + b"tail" * 100  # more than one read chunk
LONG_DIR = "ds/" + "d" * 90 + "/" + "e" * 60  # > 100 chars: prefix, GNU 'L' or pax path
DIFF_FILES = {
    "ds/a.txt": b"alpha\n", "ds/empty": b"", "ds/block": b"b" * 512, "ds/block_plus": b"c" * 513,
    "ds/sub/deep/nested.bin": BLOB, "ds/big.bin": BIG, f"{LONG_DIR}/f.txt": b"long dir\n",
    "ds/caf\u00e9/\u00fcber-\u732b.txt": b"non-ascii\n",
}
DIFF_DIRS = ["ds", "ds/sub", "ds/sub/deep", LONG_DIR]


def _tarfile_members(archive: Path) -> list[Member]:
    """What Python's tarfile reads: the reference the reader is compared against."""
    out = []
    with tarfile.open(archive, "r:*") as tf:
        for ti in tf:
            if ti.isreg():
                body = tf.extractfile(ti).read()
                out.append(Member(_normalise(ti.name), ti.size, hashlib.sha256(body).hexdigest()))
    return sorted(out, key=lambda m: m.path)


def _packed_members(archive: Path, folder: Path) -> list[Member]:
    folder.mkdir()
    packed = pack(archive, folder)
    blob = (folder / PACK_BLOB).read_bytes()
    rows = read_index((folder / INDEX).read_bytes()).to_pylist()
    stored = [r for r in rows if r["offset"] >= 0]
    assert all(r["path"].lower().endswith((".png", ".jpg", ".jpeg")) == (r["offset"] >= 0) for r in rows)
    assert all(hashlib.sha256(blob[r["offset"]:r["offset"] + r["size"]]).hexdigest() == r["sha256"] for r in stored)
    got = [Member(r["path"], r["size"], r["sha256"]) for r in rows]   # non-images: indexed, not stored
    assert packed.files == len(rows) and packed.bytes == len(blob) == sum(r["size"] for r in stored)
    return sorted(got, key=lambda m: m.path)


def _same_as_tarfile(tmp_path: Path, archive: Path) -> list[Member]:
    expected = _tarfile_members(archive)
    assert _packed_members(archive, tmp_path / "packed") == expected
    assert extract(archive, tmp_path / "extracted") == expected
    return expected


@pytest.mark.parametrize("mode", ["w", "w:gz"])
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["gnu", "pax", "ustar"])
def test_reader_matches_tarfile(tmp_path: Path, fmt: int, mode: str) -> None:
    archive = tmp_path / "in.bin"
    with tarfile.open(archive, mode, format=fmt) as tf:
        for d in DIFF_DIRS:
            tf.addfile(tinfo(d)[0])
        for name, body in DIFF_FILES.items():
            ti, _ = tinfo(name, body)
            tf.addfile(ti, io.BytesIO(body))
    expected = _same_as_tarfile(tmp_path, archive)
    assert expected == [Member(n, len(b), hashlib.sha256(b).hexdigest()) for n, b in sorted(DIFF_FILES.items())]


def test_reader_matches_tarfile_on_mnist_tiny(tmp_path: Path) -> None:
    assert len(_same_as_tarfile(tmp_path, MNIST_TINY)) > 1400


def _header(name: bytes, size: int = 0, flag: bytes = b"0", *, magic: bytes = b"ustar\x0000",
            size_field: bytes | None = None, prefix: bytes = b"", signed: bool = False) -> bytes:
    """One tar header block, built by hand so any field can be wrong on purpose."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:124] = b"0000000\0" * 2
    h[124:136] = b"%011o\0" % size if size_field is None else size_field
    h[136:148] = b"%011o\0" % 1_600_000_000
    h[156:157] = flag
    h[257:257 + len(magic)] = magic
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b" " * 8
    total = sum(struct.unpack("512b", bytes(h))) if signed else sum(h)
    h[148:156] = b"%06o\0 " % total
    return bytes(h)


def _entry(name: bytes, data: bytes = b"", flag: bytes = b"0", **kw) -> bytes:
    return _header(name, len(data), flag, **kw) + data + bytes(-len(data) % 512)


def _pax_records(**records: str) -> bytes:
    out = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        n = len(body) + 1
        while len(str(n)) + len(body) != n:  # the length counts its own digits
            n += 1
        out += str(n).encode() + body
    return out


def _raw_tar(tmp_path: Path, *entries: bytes, end: bytes = bytes(1024), gz: bool = False) -> Path:
    path = tmp_path / ("in.tgz" if gz else "in.tar")
    body = b"".join(entries) + end
    path.write_bytes(gzip.compress(body, mtime=0) if gz else body)
    return path


def test_pax_record_helper_lengths() -> None:
    for n in (1, 5, 95, 96, 97, 994, 995, 996):
        assert _pax(_pax_records(path="a" * n, size="7")) == {"path": "a" * n, "size": "7"}


def test_old_formats_match_tarfile(tmp_path: Path) -> None:
    # V7 (no magic, a directory as a regular entry ending in "/"), a ustar prefix, a signed
    # checksum, a GNU base-256 size, a GNU long name and pax records tarfile ignores.
    gnu = b"ustar  \0"
    archive = _raw_tar(
        tmp_path,
        _entry(b"v7/", flag=b"\0", magic=b""), _entry(b"v7/old.txt", b"v7 data", flag=b"\0", magic=b""),
        _entry(b"name.txt", b"prefixed", prefix=b"pre/fix"),
        _entry("ds/sign\u00e9.txt".encode(), b"signed sum", signed=True),
        _header(b"ds/b256", size_field=b"\x80" + (5).to_bytes(11, "big")) + b"12345" + bytes(507),
        _entry(b"././@LongLink", b"ds/" + b"L" * 150 + b"\0", flag=b"L", magic=gnu),
        _entry(b"ds/" + b"L" * 97, b"gnu long", magic=gnu),
        _entry(b"PaxHeader", _pax_records(mtime="1.5", uid="7", uname="x", hdrcharset="BINARY"), flag=b"x"),
        _entry(b"ds/pax_ignored.txt", b"pax"),
        _entry(b"contig.bin", b"type 7", flag=b"7"),
    )
    members = _same_as_tarfile(tmp_path, archive)
    assert [m.path for m in members] == sorted(["v7/old.txt", "pre/fix/name.txt", "ds/sign\u00e9.txt", "ds/b256",
                                                "ds/" + "L" * 150, "ds/pax_ignored.txt", "contig.bin"])


def test_pax_path_and_size_override_the_header(tmp_path: Path) -> None:
    archive = _raw_tar(tmp_path, _entry(b"PaxHeader", _pax_records(path="ds/real.txt/", size="4"), flag=b"x"),
                       _header(b"ds/fake.txt", 999) + b"data" + bytes(508))
    assert _same_as_tarfile(tmp_path, archive) == [Member("ds/real.txt", 4, hashlib.sha256(b"data").hexdigest())]


def test_single_zero_block_end_marker_is_accepted_like_tarfile(tmp_path: Path) -> None:
    archive = _raw_tar(tmp_path, _entry(b"ds/a.txt", b"x"), end=bytes(512))
    assert [m.path for m in _same_as_tarfile(tmp_path, archive)] == ["ds/a.txt"]


def test_global_pax_comment_is_ignored(tmp_path: Path) -> None:
    # git archive writes one: "comment=<commit id>"
    archive = _raw_tar(tmp_path, _entry(b"pax_global_header", _pax_records(comment="ab" * 20), flag=b"g"),
                       _entry(b"ds/a.txt", b"x"))
    assert [m.path for m in _same_as_tarfile(tmp_path, archive)] == ["ds/a.txt"]


@pytest.mark.parametrize(("field", "value"), [
    (b"00000000644\0", 0o644), (b"     644 \0\0\0", 0o644), (b"644\0garbage!", 0o644), (b"\0" * 12, 0),
    (b" " * 12, 0), (b"\x80" + (2**80).to_bytes(11, "big"), 2**80), (b"0000000\0", 0)])
def test_number_parses_octal_and_base256(field: bytes, value: int) -> None:
    assert _number(field) == value


@pytest.mark.parametrize("field", [b"\xff" * 12, b"\xff" + bytes(11), b"+0000000644\0", b"-0000000644\0",
                                   b"0o644\0\0\0\0\0\0\0", b"6_44\0\0\0\0\0\0\0\0", b"00000000649\0",
                                   b"0000 644\0\0\0\0", b"\x81" + bytes(11), b"12\xc2\xb2\0\0\0\0\0\0\0\0"])
def test_number_rejects(field: bytes) -> None:
    with pytest.raises(ValueError):
        _number(field)


@pytest.mark.parametrize("data", [b"99 path=x\n", b"4 path=x\n", b"11 path=x\n", b"9 path=x ", b"8 pathx\n",
                                  b"5 =x\n", b"x path=x\n", b"9 path=x\nfoo", b"9 path=x\n\0\0x", b" 9 path=x\n",
                                  b"00000000000000000000009 path=x\n"])
def test_pax_rejects_malformed_records(data: bytes) -> None:
    with pytest.raises(ValueError):
        _pax(data)


def test_pax_accepts_nul_padding_and_empty_values() -> None:
    assert _pax(b"9 path=x\n6 a=b\n5 c=\n" + bytes(20)) == {"path": "x", "a": "b", "c": ""}
    assert _pax("14 path=\u732b.x\n".encode()) == {"path": "\u732b.x"}


def _second_header_flipped(tmp_path: Path, at: int) -> Path:
    body = bytearray(_entry(b"ds/a.txt", b"x") + _entry(b"ds/b.txt", b"y") + bytes(1024))
    body[1024 + at] ^= 0x01
    return _raw_tar(tmp_path, bytes(body), end=b"")


@pytest.mark.parametrize("at", [0, 100, 124, 148, 156, 257, 345, 511])
def test_bad_header_checksum_is_refused(tmp_path: Path, sentinel: Path, at: int) -> None:
    assert_refused(tmp_path, _second_header_flipped(tmp_path, at),
                   "corrupt or truncated archive: bad header checksum at offset 1024")


def test_bad_first_header_checksum_in_a_tgz_is_refused(tmp_path: Path, sentinel: Path) -> None:
    body = bytearray(_entry(b"ds/a.txt", b"x"))
    body[0] ^= 0x01
    err = assert_refused(tmp_path, _raw_tar(tmp_path, bytes(body), gz=True), "bad header checksum at offset 0")
    assert str(tmp_path / "in.tgz") in str(err)


@pytest.mark.parametrize(("cut", "match"), [(1024 + 100, "header at offset 1024 is cut short"),
                                            (512 + 100, "'ds/a.txt' is cut short"),  # in the padding
                                            (512 + 1, "'ds/a.txt' is cut short"),
                                            (512, "'ds/a.txt' is cut short"),  # no data at all
                                            (100, "not a tar"), (2048 + 100, "end-of-archive marker"),
                                            (2048 + 512, None)])
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tgz"])
def test_truncation_anywhere_is_refused(tmp_path: Path, sentinel: Path, cut: int, match: str | None,
                                        gz: bool) -> None:
    body = (_entry(b"ds/a.txt", b"x") + _entry(b"ds/b.txt", b"y") + bytes(1024))[:cut]
    archive = _raw_tar(tmp_path, body, end=b"", gz=gz)
    if match is None:  # one whole zero block: tarfile accepts it, so do we
        assert [m.path for m in extract(archive, tmp_path / "out")] == ["ds/a.txt", "ds/b.txt"]
    elif gz and match == "not a tar":  # sniffed as gzip: the tar inside is a cut header
        assert_refused(tmp_path, archive, "corrupt or truncated archive: header at offset 0 is cut short")
    else:
        assert_refused(tmp_path, archive, match)


def test_big_member_cut_short_is_refused(tmp_path: Path, sentinel: Path) -> None:
    archive = _raw_tar(tmp_path, (_header(b"ds/big", len(BIG)) + BIG)[: 512 + len(BIG) - 1], end=b"", gz=True)
    assert_refused(tmp_path, archive, "'ds/big' is cut short")


def test_zero_block_then_data_is_refused(tmp_path: Path, sentinel: Path) -> None:
    archive = _raw_tar(tmp_path, _entry(b"ds/a.txt", b"x"), end=bytes(512) + _entry(b"ds/hidden", b"y") + bytes(1024))
    assert_refused(tmp_path, archive, "end-of-archive marker")


PAX_HOSTILE = {
    "bad_length": (_entry(b"PaxHeader", b"99 path=ds/x\n", flag=b"x"), "pax header at offset 0.*bad length"),
    "no_equals": (_entry(b"PaxHeader", b"12 pathds/x\n", flag=b"x"), "pax header at offset 0.*malformed"),
    "bad_size": (_entry(b"PaxHeader", _pax_records(size="-5"), flag=b"x"), "invalid size '-5'"),
    "size_word": (_entry(b"PaxHeader", _pax_records(size="ten"), flag=b"x"), "invalid size 'ten'"),
    "dotdot_path": (_entry(b"PaxHeader", _pax_records(path="ds/../../evil"), flag=b"x"),
                    "'ds/\\.\\./\\.\\./evil'.*'\\.\\.' component"),
    "absolute_path": (_entry(b"PaxHeader", _pax_records(path="/etc/evil"), flag=b"x"), "absolute path"),
    "empty_path": (_entry(b"PaxHeader", _pax_records(path=""), flag=b"x"), "empty name"),
    "nul_in_path": (_entry(b"PaxHeader", _pax_records(path="ds/a\0b"), flag=b"x"), "NUL byte"),
    "sparse": (_entry(b"PaxHeader", _pax_records(**{"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}),
                      flag=b"x"), "sparse files are not allowed"),
    "global_path": (_entry(b"pax_global_header", _pax_records(path="ds/x"), flag=b"g"),
                    "global pax header at offset 0 sets 'path'"),
    "global_size": (_entry(b"pax_global_header", _pax_records(size="1"), flag=b"g"), "sets 'size'"),
    "gnu_dotdot": (_entry(b"././@LongLink", b"../" * 40 + b"evil\0", flag=b"L", magic=b"ustar  \0"),
                   "'\\.\\.' component"),
    "huge_ext": (_header(b"PaxHeader", 2 << 20, b"x"), "extended header at offset 0 declares 2097152 bytes"),
}


@pytest.mark.parametrize("case", PAX_HOSTILE)
def test_hostile_extended_headers_are_refused(tmp_path: Path, sentinel: Path, case: str) -> None:
    ext, match = PAX_HOSTILE[case]
    assert_refused(tmp_path, _raw_tar(tmp_path, ext, _entry(b"ds/a.txt", b"x"), gz=True), match)


def test_pax_size_past_the_data_is_refused(tmp_path: Path, sentinel: Path) -> None:
    archive = _raw_tar(tmp_path, _entry(b"PaxHeader", _pax_records(size="100000"), flag=b"x"),
                       _entry(b"ds/a.txt", b"x" * 10), gz=True)
    assert_refused(tmp_path, archive, "'ds/a.txt' is cut short")


def test_extended_header_with_no_member_is_refused(tmp_path: Path, sentinel: Path) -> None:
    archive = _raw_tar(tmp_path, _entry(b"ds/a.txt", b"x"), _entry(b"PaxHeader", _pax_records(path="ds/b"), flag=b"x"))
    assert_refused(tmp_path, archive, "extended header at offset 1024 is not followed by a member")


def test_negative_base256_size_is_refused(tmp_path: Path, sentinel: Path) -> None:
    archive = _raw_tar(tmp_path, _entry(b"ds/a.txt", b"x"), _header(b"ds/neg", size_field=b"\xff" * 12))
    assert_refused(tmp_path, archive, "header at offset 1024: invalid size")


def test_huge_base256_size_hits_the_member_cap(tmp_path: Path, sentinel: Path) -> None:
    archive = _raw_tar(tmp_path, _header(b"ds/huge", size_field=b"\x80" + (2**80).to_bytes(11, "big")))
    assert_refused(tmp_path, archive, "'ds/huge'.*member cap")


@pytest.mark.parametrize(("flag", "kind"), [(b"1", "hardlinks"), (b"2", "symlinks"), (b"3", "character devices"),
                                            (b"4", "block devices"), (b"6", "FIFOs"), (b"S", "sparse files"),
                                            (b"V", "entries of type b'V's"), (b"D", "entries of type b'D's")])
@pytest.mark.parametrize("magic", [b"ustar\x0000", b"ustar  \0", b""], ids=["ustar", "gnu", "v7"])
def test_special_entries_are_refused_in_every_format(tmp_path: Path, sentinel: Path, flag: bytes, kind: str,
                                                     magic: bytes) -> None:
    archive = _raw_tar(tmp_path, _entry(b"ds/a.txt", b"x", magic=magic), _entry(b"ds/special", flag=flag, magic=magic))
    assert_refused(tmp_path, archive, f"'ds/special'.*{kind} are not allowed")


def test_many_global_headers_hit_the_byte_budget(tmp_path: Path, sentinel: Path) -> None:
    g = _entry(b"pax_global_header", _pax_records(comment="x"), flag=b"g")
    archive = _raw_tar(tmp_path, g * 2048, _entry(b"ds/a.txt", b"x"), gz=True)
    assert_refused(tmp_path, archive, "decompresses to more than its members declare")


def test_a_few_kb_of_pax_xattrs_per_member_is_metadata_not_a_bomb(tmp_path: Path) -> None:
    """macOS tar stores extended attributes as pax records: a few KB per file, thousands of files."""
    path = tmp_path / "mac.tgz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for i in range(3000):
            info, _ = tinfo(f"ds/train/{i % 2}/{i}.txt", b"x")
            info.pax_headers = {"SCHILY.xattr.com.apple.metadata:kMDItemWhereFroms": "w" * 5000,
                                "SCHILY.xattr.com.apple.quarantine": "0081;6"}
            tf.addfile(info, io.BytesIO(b"x"))
    extract(str(path), str(tmp_path / "out"))
    assert len(list((tmp_path / "out" / "ds" / "train" / "1").iterdir())) == 1500
    (tmp_path / "packed").mkdir()
    assert pack(path, tmp_path / "packed").files == 3000


def test_non_utf8_name_is_kept_as_tarfile_decodes_it(tmp_path: Path) -> None:
    archive = _raw_tar(tmp_path, _entry(b"ds/\xff.bin", b"abc"))
    expected = _tarfile_members(archive)
    assert [m.path for m in expected] == ["ds/\udcff.bin"]
    assert extract(archive, tmp_path / "out") == expected


def test_gnu_header_times_are_not_a_name_prefix(tmp_path: Path) -> None:
    # GNU headers keep atime/ctime where ustar keeps its prefix; tarfile would read
    # "14712345670/ds/f.txt" here.
    archive = _raw_tar(tmp_path, _entry(b"ds/f.txt", b"1", magic=b"ustar  \0", prefix=b"14712345670\x00" * 2))
    assert [m.path for m in extract(archive, tmp_path / "out")] == ["ds/f.txt"]


def test_pack_refuses_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    """extract() can write any bytes as a file name; the packed index holds UTF-8 text only."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        info = tarfile.TarInfo("ds/caf\xe9.png")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    archive = tmp_path / "latin1.tar"
    archive.write_bytes(buf.getvalue())
    (tmp_path / "out").mkdir()
    with pytest.raises(ArchiveError, match=r"latin1\.tar: member .*name is not valid UTF-8"):
        pack(str(archive), tmp_path / "out")


def test_a_very_deep_or_long_member_path_is_refused_at_once(tmp_path: Path, sentinel: Path) -> None:
    """One member 200 folders deep once made a run take minutes (every ancestor folder in the
    manifest, layout work growing with the depth)."""
    deep = "/".join(["d"] * 200) + "/x.png"
    assert_refused(tmp_path, write_tar(tmp_path / "deep.tgz", [tinfo(deep, b"x")]), "levels deep, over the cap of 32")
    long = "ds/" + "n" * 1100 + ".png"
    assert_refused(tmp_path, write_tar(tmp_path / "long.tgz", [tinfo(long, b"x")]), "longer than 1024 bytes")


# Plain headers (short name, type "0", fields written the usual way) take untar's batched
# path; every rule must hold there exactly as on the general path.
JUNK = [b"ds/._a.png", b"__MACOSX/ds/a.png", b"ds/.DS_Store"]
REFUSED = [b"ds/../x.png", b"/abs.png", b"ds//a.png", b"./ds/a.png", b"ds/./a.png", b"ds\\a.png", b"C:a.png",
           b"d/" * 33 + b"a.png", b"ds/a.png/", b"ds", b"ds/a.png", b"ds/\xff.png"]


@pytest.mark.parametrize("name", JUNK + REFUSED, ids=lambda n: n.decode("latin-1")[:24])
def test_plain_headers_follow_the_general_rules(tmp_path: Path, name: bytes) -> None:
    archive = _raw_tar(tmp_path, _entry(b"ds/a.png", b"first"), _entry(name, b"second"))
    if name in JUNK:   # skipped, never stored
        assert [m.path for m in _packed_members(archive, tmp_path / "packed")] == ["ds/a.png"]
    else:
        (tmp_path / "packed").mkdir()
        with pytest.raises(ArchiveError, match="member"):
            pack(archive, tmp_path / "packed")


def test_plain_headers_follow_the_caps(tmp_path: Path) -> None:
    archive = _raw_tar(tmp_path, *(_entry(b"ds/%d.png" % i, b"x" * 10) for i in range(5)))
    for i, (caps, why) in enumerate(((Caps(max_members=4), "more than 4 members"),
                                     (Caps(max_total_bytes=45), "more than 45 bytes"),
                                     (Caps(max_member_bytes=9), "member cap"), (Caps(max_depth=1), "levels deep"),
                                     (Caps(max_path_bytes=7), "longer than 7 bytes"))):
        (tmp_path / str(i)).mkdir()
        with pytest.raises(ArchiveError, match=why):
            pack(archive, tmp_path / str(i), caps=caps)
    (tmp_path / "ok").mkdir()
    assert pack(archive, tmp_path / "ok", caps=Caps(max_members=6, max_total_bytes=50, max_member_bytes=10)).files == 5


def test_an_unreadable_folder_of_a_folder_source_is_an_error_not_a_missing_class(tmp_path: Path, monkeypatch) -> None:
    """os.walk passes over a folder it cannot list; a folder source must not lose a class that way."""
    from pixelsim.storage.archive import folder_files
    for c in ("3", "7"):
        (tmp_path / "src" / "train" / c).mkdir(parents=True)
        (tmp_path / "src" / "train" / c / "a.png").write_bytes(b"x")
    real = os.scandir

    def scandir(path):   # what a folder without read permission does for a non-root user
        if str(path).endswith(os.path.join("train", "7")):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match=r"cannot list a folder of the source.*train/7"):
        list(folder_files(str(tmp_path / "src")))


ODD = ["ds/../x.png", "/abs.png", "ds//a.png", "./ds/a.png", "ds/./a.png", "ds\\a.png", "C:a.png", "a:b/c.png",
       "ds/._a.png", "__MACOSX/ds/a.png", "ds/.DS_Store", "ds/x.DS_Store", "d/" * 33 + "a.png", "ds/é.png",
       "ds/notes.txt", "ds/UPPER.PNG", "ds/a.jpeg", "ds/" + "n" * 120 + ".png", "ds/.hidden.png", "ds/a.png/",
       # a file, then a folder of its name; a folder, then a file of its name; one file twice (with a
       # refusal far later, which must not come first)
       ("ds/train/3/7.png", "ds/train/3/7.png/x.png"), ("ds/valid/1/x.png/y.png", "ds/valid/1/x.png"),
       ("ds/train/0/9.png", "ds/train/0/9.png")]


@pytest.mark.parametrize("odd", [None, *ODD], ids=lambda o: "usual" if o is None else repr(o)[:30])
def test_the_batched_path_decides_exactly_as_the_member_by_member_path(tmp_path: Path, monkeypatch, odd) -> None:
    """Untar takes the usual members a buffer at a time. Random archives of thousands of such
    members, with hostile, junk, clashing, duplicate, non-image, non-ASCII or large members put
    among them, give the same blob and index, or the same refusal, as the general
    path taken one member at a time."""
    import random

    from pixelsim.storage import archive as A
    rng = random.Random(repr(odd))
    n = rng.randrange(2000, 4000)
    names = [f"ds/{rng.choice(['train', 'valid'])}/{rng.randrange(3)}/{i}.png" for i in range(n)]
    odds = [] if odd is None else [odd] if isinstance(odd, str) else list(odd)
    at = rng.randrange(n - 100)   # together, so that they fall in one batch
    names[at:at] = odds
    if len(odds) > 1:
        names.append("ds/../x.png")
    entries = [tinfo(name, rng.randbytes(rng.choice([0, 1, 300, 511, 512, 513, 1500])
                                        if rng.random() > 0.002 else (1 << 20) + 7)) for name in names]
    archive = write_tar(tmp_path / "mixed.tar", entries, mode="w")

    def packed(folder: Path) -> tuple:
        folder.mkdir()
        try:
            out = pack(archive, folder)
        except ArchiveError as e:
            return ("refused", str(e))
        return (out, (folder / PACK_BLOB).read_bytes(), read_index((folder / INDEX).read_bytes()).to_pydict())

    batched = packed(tmp_path / "batched")
    monkeypatch.setattr(A._Packer, "plains", A._Writer.plains)
    assert batched == packed(tmp_path / "one-by-one")
    if odd is None:   # only the usual members: all taken, in batches
        assert batched[0] != "refused" and batched[0].files == len(entries)


def test_a_size_field_with_non_octal_digits_after_a_batch_is_a_corrupt_archive(tmp_path: Path, sentinel: Path) -> None:
    """Read-ahead at a batch's end must not parse what `next` would refuse (a ValueError before)."""
    body = bytearray(_entry(b"ds/a.png", b"x" * 10) + _entry(b"ds/b.png", b"y" * 10) + bytes(1024))
    body[1024 + 124:1024 + 136] = b"00000000019\0"
    archive = tmp_path / "nine.tar"
    archive.write_bytes(bytes(body))
    assert_refused(tmp_path, archive, "bad header checksum at offset 1024")


def test_reading_ahead_for_a_batch_stays_within_the_byte_budget(tmp_path: Path) -> None:
    """A member's bytes are read once its size is granted: 1 MB of pax comment (metadata over
    its 64 KiB grant) then a 300 KB member is a valid archive, as tarfile says."""
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("a.png")
        ti.size, ti.pax_headers = 10, {"comment": "c" * 1_000_000}
        tf.addfile(ti, io.BytesIO(b"x" * 10))
        ti = tarfile.TarInfo("b.png")
        ti.size = 300_000
        tf.addfile(ti, io.BytesIO(b"y" * 300_000))
    archive = tmp_path / "comment.tar"
    archive.write_bytes(b.getvalue())
    members = _packed_members(archive, tmp_path / "packed")
    assert [(m.path, m.size) for m in members] == [("a.png", 10), ("b.png", 300_000)]


def test_the_blob_writer_keeps_no_read_buffer_alive(tmp_path: Path) -> None:
    """Members written one by one are views of a 1 MiB read buffer: the writer copies them (and
    skips empty ones), or millions of tiny members would pin a buffer each (1 GiB at 2M)."""
    import sys

    from pixelsim.storage.archive import _Sink
    with open(tmp_path / "blob", "wb") as out:
        sink = _Sink(out, str(tmp_path / "index.parquet"))
        buf = bytes(range(256)) * 4096
        before = sys.getrefcount(buf)
        for i in range(100):
            sink.write(memoryview(buf)[i:i + 3])
            sink.write(memoryview(buf)[i:i])
        assert sys.getrefcount(buf) == before and len(sink.parts) == 100
        sink.close()
    assert (tmp_path / "blob").read_bytes() == b"".join(buf[i:i + 3] for i in range(100))


def test_a_zip_member_in_a_compression_method_the_reader_lacks_is_named_not_called_corrupt(tmp_path):
    """Windows writes Deflate64 (method 9) for large files: not damage, so not "corrupt or
    truncated" with advice to fetch it again, but what it is and what to do."""
    import struct
    import zipfile

    from pixelsim.storage.archive import pack

    path = tmp_path / "d64.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("ds/train/3/a.png", b"x" * 100)
    data = bytearray(path.read_bytes())
    for sig, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):   # the method field of the local and central headers
        i = data.index(sig)
        data[i + at:i + at + 2] = struct.pack("<H", 9)
    path.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(ArchiveError, match="uses a feature this reader does not support") as e:
        pack(path, tmp_path / "out")
    assert not isinstance(e.value, CorruptArchive) and "repack it" in str(e.value)
