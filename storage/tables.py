"""Arrow helpers: a digest of a table's rows, the same wherever the table was read or sliced
from, and arrays built from their buffers, because `pa.array` imports pandas (in every process
that calls it: each pool worker, the untar step) to ask whether its input is a pandas object."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa


def strings(values: list[str] | bytes, width: int = 0) -> pa.Array:
    """A string array of UTF-8 texts, or (with `width`) of one bytes object of texts that many
    bytes each; under 2 GiB of text in all (int32 offsets), else OverflowError."""
    if width:
        data, offsets = values, np.arange(0, len(values) + 1, width, dtype=np.int64)
    else:
        data = "".join(values).encode()
        lengths = map(len, values) if len(data) == sum(map(len, values)) else (len(v.encode()) for v in values)
        offsets = np.zeros(len(values) + 1, np.int64)
        np.cumsum(np.fromiter(lengths, np.int64, len(values)), out=offsets[1:])
    if len(data) >= 1 << 31:
        raise OverflowError(f"{len(data)} bytes of text is more than one string array holds")
    return pa.StringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data))


def numbers(values: list[int] | np.ndarray, dtype: type = np.int64) -> pa.Array:
    """A fixed-width numeric array (no nulls) of `values` as `dtype`."""
    data = np.ascontiguousarray(values, dtype)
    return pa.Array.from_buffers(pa.from_numpy_dtype(data.dtype), len(data), [None, pa.py_buffer(data)])


def table_digest(table: pa.Table) -> str:
    """sha256 of the rows as an Arrow IPC stream, written from fresh buffers (no slice offsets,
    one chunk) and without schema metadata: equal rows give equal digests, and one changed value
    anywhere changes it."""
    t = table.replace_schema_metadata(None)
    t = t.take(numbers(np.arange(len(t)))).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def release() -> None:
    """Hand the pages Arrow's allocator kept from freed arrays back to the system. mimalloc
    keeps them for reuse, so a plan's passes over a million paths would otherwise leave the
    process holding about twice what it ever had allocated at once."""
    pa.default_memory_pool().release_unused()
