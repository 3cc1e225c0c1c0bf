"""A digest of an Arrow table's rows, the same wherever the table was read or sliced from."""
from __future__ import annotations

import hashlib

import pyarrow as pa


def table_digest(table: pa.Table) -> str:
    """sha256 of the rows as an Arrow IPC stream, written from fresh buffers (no slice offsets,
    one chunk) and without schema metadata: equal rows give equal digests, and one changed value
    anywhere changes it."""
    t = table.replace_schema_metadata(None)
    t = t.take(pa.array(range(len(t)), pa.int64())).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return hashlib.sha256(sink.getvalue()).hexdigest()
