"""Image tensors in Parquet shards.

Each image is one `fixed_size_binary(H*W*C)` cell of raw uint8 pixels: measured ~10x
faster to load than a list/tensor column, and still readable by pyarrow, pandas,
DuckDB (BLOB) and Polars (Binary). Shape, dtype, class names and the source digest
live in the schema metadata under the key `pixelsim`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pixelsim.storage.errors import IntegrityError
from pixelsim.storage.images import decode_members
from pixelsim.storage.root import Root, sha256_file
from pixelsim.storage.tables import numbers, strings, table_digest

META_KEY = b"pixelsim"
# A set's plan: which archive members each of its shards holds, one row group per shard, in
# the shards' order. Jobs read their rows from it (a row group each) instead of carrying
# them, and a later set of a grown archive matches its members against it (path and sha256)
# to reuse whole shards (tasks.convert.assign). In a "_" subfolder, so `<set>/*.parquet`
# (DuckDB, Polars, pandas) and dataset readers see only shards.
MEMBERS = "_plan/members.parquet"
PLAN_SCHEMA = pa.schema([("part", pa.string()), ("path", pa.string()), ("label", pa.int64()),
                         ("sha256", pa.string()), ("size", pa.int64()), ("offset", pa.int64())])


@dataclass(frozen=True)
class ShardMeta:
    shape: tuple[int, ...]        # one image: (H, W) or (H, W, C)
    classes: list[str]
    split: str
    source_sha256: str

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": "uint8", "classes": self.classes,
                "split": self.split, "source_sha256": self.source_sha256,
                "columns": {"image": "raw uint8 pixels, row-major HxW[xC]",
                            "label": "class name", "label_index": "index into classes"}}


class Member(NamedTuple):
    """One image file of a shard, as the unpacking index has it."""

    path: str
    label: int       # index into the classes
    sha256: str
    size: int
    offset: int      # in the members blob


def write_shard(path: str, meta: ShardMeta, paths: list[str] | pa.Array, labels: np.ndarray,
                images: np.ndarray) -> None:
    """Write one shard to a local staging path (published later with its folder)."""
    n = len(paths)
    width = int(np.prod(meta.shape))
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(n, width)
    image_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(flat)])
    table = pa.table({
        "path": paths if isinstance(paths, pa.Array) else strings(paths),
        "label": pa.DictionaryArray.from_arrays(numbers(labels, np.int32), strings(list(meta.classes))),
        "label_index": numbers(labels, np.int16),
        "image": image_col,
    }).replace_schema_metadata({META_KEY: json.dumps(meta.to_dict()).encode()})
    pq.write_table(table, path, compression="zstd", row_group_size=max(n, 1))


def member_bytes(root: Root, blob: str, offsets: list[int], sizes: list[int]) -> list[bytes]:
    """The bytes of the members at these offsets and sizes in the members `blob` (b"" for one
    that was indexed but not stored, offset -1: not an image by its name, see storage.archive)."""
    stored = [(o, n) for o, n in zip(offsets, sizes) if o >= 0]
    if len(stored) == len(offsets):
        return root.read_ranges(blob, stored)
    got = iter(root.read_ranges(blob, stored) if stored else [])
    return [next(got) if o >= 0 else b"" for o in offsets]


class PlanGroup(NamedTuple):
    """A shard's rows by reference: its row group of the set's plan file and the digest it was
    planned with. A pool worker reads them itself, so the flow's process neither reads nor
    pickles a shard's rows."""

    plan: str
    group: int
    digest: str


def build_shard(root: str, blob: str, rows: pa.Table | PlanGroup, dest: str, meta: ShardMeta, *,
                channels: int = 1, resize: bool = False, draft: bool = False, skip_bad: bool = False) -> dict:
    """Read one shard's members (`rows` of Member's columns, or their PlanGroup) from the `blob`
    file, check each against its digest, decode them and write the shard to `dest` (a part path).

    The whole shard is one call with small arguments, so a process pool worker can do all of
    it (reads, hashing, decoding, Parquet) while importing only `storage`. With bad files and
    not `skip_bad` nothing is written: {"errors": [...]} tells the caller.
    """
    r = Root(root)
    if isinstance(rows, PlanGroup):
        rows = plan_rows(r, *rows)
    paths = rows.column("path").to_pylist()
    datas = member_bytes(r, blob, rows.column("offset").to_pylist(), rows.column("size").to_pylist())
    images, good, errors = decode_members(list(zip(paths, rows.column("sha256").to_pylist(), datas)),
                                          channels=channels, size=tuple(meta.shape[:2]), resize=resize,
                                          draft=draft)
    if errors and not skip_bad:
        return {"errors": errors}
    try:   # one copy of every image's bytes (each is meta.shape, uint8, by decode_members' contract)
        pixels = np.frombuffer(b"".join(images), np.uint8).reshape(len(images), *meta.shape)
    except TypeError:   # an image that is a strided view, which join cannot read
        pixels = np.stack(images)
    labels = rows.column("label").to_numpy()[np.array(good, dtype=np.int64)].astype(np.int64)
    path = rows.column("path")
    with r.staged_file(dest) as tmp:
        write_shard(tmp, meta, (path.take(numbers(good)) if errors else path).combine_chunks(), labels, pixels)
        digest, size = sha256_file(tmp)
    return {"sha256": digest, "bytes": size, "rows": len(good), "errors": errors,
            "counts": np.bincount(labels, minlength=len(meta.classes)).tolist()}


class PlanWriter:
    """A MEMBERS file, written a shard at a time: each (shard file name, its rows of Member's
    columns) as one row group, so the whole plan is never held as a table. Deterministic for
    equal input."""

    def __init__(self) -> None:
        self.sink = pa.BufferOutputStream()
        self.writer = pq.ParquetWriter(self.sink, PLAN_SCHEMA, compression="zstd")

    def add(self, name: str, rows: pa.Table) -> None:
        self.writer.write_table(rows.select(list(Member._fields)).add_column(0, "part", pa.repeat(name, len(rows)))
                                .cast(PLAN_SCHEMA), row_group_size=max(len(rows), 1))

    def finish(self) -> bytes:
        self.writer.close()
        return self.sink.getvalue().to_pybytes()


def rows_digest(rows: pa.Table) -> str:
    """The digest of what a shard's rows are made of (paths, labels, sha256s, in order), the
    same for equal rows wherever they were sliced from."""
    made_of = ["path", "label", "sha256"]
    return table_digest(rows.select(made_of).cast(pa.schema([PLAN_SCHEMA.field(c) for c in made_of])))


def plan_rows(root: Root, rel: str, group: int, digest: str) -> pa.Table:
    """One shard's members (Member's columns) from its set's MEMBERS file, checked against the
    digest it was planned with."""
    with root.open(rel) as f:
        rows = pq.ParquetFile(f).read_row_group(group, columns=list(Member._fields))
    if rows_digest(rows) != digest:
        raise IntegrityError(f"{root.uri(rel)}: row group {group} is not the shard it was planned as "
                             "(the plan was rewritten or damaged); run again")
    return rows


def parse_members(data: bytes) -> pa.Table:
    """A MEMBERS file's (part, path, sha256), from its bytes (checked against its manifest by the caller)."""
    # a part's name as a code (4 bytes a row, not a string of 30 each: a million rows' plan)
    f = pq.ParquetFile(pa.BufferReader(data), read_dictionary=["part"])
    if f.schema_arrow.names != PLAN_SCHEMA.names:
        raise IntegrityError(f"{MEMBERS}: columns {f.schema_arrow.names}, expected {PLAN_SCHEMA.names}")
    return f.read(columns=["part", "path", "sha256"])


def read_meta(root: Root, rel: str) -> dict:
    with root.open(rel) as f:
        return json.loads(pq.read_schema(f).metadata[META_KEY])


def iter_arrays(root: Root, rels: list[str], columns: tuple[str, ...] = ("label_index", "image"),
                sha256: dict[str, str] | None = None) -> Iterator[dict[str, np.ndarray | list]]:
    """Yield one shard at a time: memory stays bounded by the shard size, not the dataset.

    With `sha256` ({shard: digest}) each shard's bytes are checked before they are parsed,
    so a truncated or altered shard is an IntegrityError, never data.
    """
    for rel in rels:
        data = root.read_bytes(rel)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256[rel]:
            raise IntegrityError(f"{root.uri(rel)}: does not match its manifest (truncated or altered)")
        table = pq.ParquetFile(pa.BufferReader(data)).read(columns=list(columns))  # not read_table: see read_index
        out: dict[str, np.ndarray | list] = {}
        for name in columns:
            col = table.column(name).combine_chunks()
            if name == "image":
                width = col.type.byte_width
                buf = col.buffers()[1]
                out[name] = np.frombuffer(buf, np.uint8, count=len(col) * width,
                                          offset=col.offset * width).reshape(len(col), width)
            elif name == "path":
                out[name] = col.to_pylist()
            else:
                out[name] = col.to_numpy()
        yield out
