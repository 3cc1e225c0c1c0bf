"""Templates, predictions and reports as files analysts can open directly."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.images import encode_png
from storage.root import Root, Staging

TEMPLATES = "templates.parquet"


def write_templates(staging: Staging, classes: list[str], counts: list[int], means: np.ndarray,
                    shape: tuple[int, ...]) -> None:
    """Means as float32 lists (one row per class) plus one viewable PNG per class."""
    width = int(np.prod(shape))
    flat = means.astype(np.float32).reshape(len(classes), width)
    table = pa.table({
        "class": pa.array(classes, pa.string()),
        "count": pa.array(counts, pa.int64()),
        "template": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), width),
    }).replace_schema_metadata({b"pixelsim": json.dumps({"shape": list(shape)}).encode()})
    pq.write_table(table, staging.file(TEMPLATES), compression="zstd")
    staging.add(TEMPLATES)
    for i, name in enumerate(classes):
        pixels = np.rint(flat[i].reshape(shape) * 255).clip(0, 255).astype(np.uint8)
        staging.write_bytes(f"{name}.png", encode_png(pixels))


def read_templates(root: Root, rel: str) -> tuple[list[str], np.ndarray, tuple[int, ...]]:
    with root.open(rel) as f:
        table = pq.read_table(f)
    shape = tuple(json.loads(table.schema.metadata[b"pixelsim"])["shape"])
    col = table.column("template").combine_chunks()
    means = col.values.to_numpy().reshape(len(table), -1)
    return table.column("class").to_pylist(), means, shape


def write_predictions(path: str, columns: dict[str, list | np.ndarray | pa.Array]) -> None:
    """Columns may be lists, numpy arrays or Arrow arrays; the file's schema is the same for all."""
    dist = columns["distances"]
    table = pa.table({
        "path": _array(columns["path"], pa.string()),
        "label": _array(columns["label"], pa.string()),
        "metric": _array(columns["metric"], pa.string()),
        "predicted": _array(columns["predicted"], pa.string()),
        "correct": _array(columns["correct"], pa.bool_()),
        "distance": _array(columns["distance"], pa.float32()),
        "distances": pa.FixedSizeListArray.from_arrays(pa.array(dist.ravel(), pa.float32()), dist.shape[1]),
    })
    pq.write_table(table, path, compression="zstd")


def _array(values: list | np.ndarray | pa.Array, type_: pa.DataType) -> pa.Array:
    if isinstance(values, pa.Array):
        return values if values.type == type_ else values.cast(type_)
    return pa.array(values, type_)


def confusion_csv(classes: list[str], matrix: list[list[int]]) -> bytes:
    """Rows are true classes, columns predicted classes."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["true\\predicted", *classes])
    for name, row in zip(classes, matrix):
        w.writerow([name, *row])
    return out.getvalue().encode()
