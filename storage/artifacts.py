"""Templates, predictions and reports as files analysts can open directly."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pixelsim.storage import catalog
from pixelsim.storage.images import encode_png
from pixelsim.storage.root import Root, Staging

TEMPLATES = "templates.parquet"

# Up to this many classes a confusion matrix is shown whole (report.md, report.html, the UI)
# and kept dense in report.json; beyond, report.json keeps its non-zero cells (at most one per
# validation image) and the pages show the TOP_CONFUSIONS most frequent mistakes, so what a
# report renders grows with the classes, never with their square. confusion-<metric>.csv
# always holds the whole matrix.
MAX_MATRIX = 30
TOP_CONFUSIONS = 20
MAX_PICTURES = 100   # class templates pictured in report.html and the UI; all are in the templates folder


def scope_columns(scope: dict[str, str], n: int) -> dict[str, pa.Array]:
    """Constant string columns saying which output a row belongs to (dataset, key), so rows globbed
    from several folders of a root can be told apart (Parquet's dictionary pages store them almost free)."""
    return {name: pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], pa.string()))
            .dictionary_decode() for name, value in scope.items()}


def write_templates(staging: Staging, classes: list[str], counts: list[int], means: np.ndarray,
                    shape: tuple[int, ...], scope: dict[str, str] | None = None) -> None:
    """Means as float32 lists (one row per class) plus one viewable PNG per class."""
    width = int(np.prod(shape))
    flat = means.astype(np.float32).reshape(len(classes), width)
    table = pa.table({
        **scope_columns(scope or {}, len(classes)),
        "class": pa.array(classes, pa.string()),
        "count": pa.array(counts, pa.int64()),
        "template": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), width),
    }).replace_schema_metadata({b"pixelsim": json.dumps({"shape": list(shape)}).encode()})
    pq.write_table(table, staging.file(TEMPLATES), compression="zstd")
    staging.add(TEMPLATES)
    for i, picture in enumerate(catalog.template_images(classes)):
        pixels = np.rint(flat[i].reshape(shape) * 255).clip(0, 255).astype(np.uint8)
        staging.write_bytes(picture, encode_png(pixels))


def read_templates(root: Root, rel: str) -> tuple[list[str], np.ndarray, tuple[int, ...]]:
    return parse_templates(root.read_bytes(rel))


def parse_templates(data: bytes) -> tuple[list[str], np.ndarray, tuple[int, ...]]:
    """(classes, means, shape) from the bytes of a templates.parquet."""
    table = pq.ParquetFile(pa.BufferReader(data)).read()
    shape = tuple(json.loads(table.schema.metadata[b"pixelsim"])["shape"])
    col = table.column("template").combine_chunks()
    means = col.values.to_numpy().reshape(len(table), -1)
    return table.column("class").to_pylist(), means, shape


def write_predictions(path: str, columns: dict[str, list | np.ndarray | pa.Array],
                      scope: dict[str, str] | None = None) -> None:
    """Columns may be lists, numpy arrays or Arrow arrays; the file's schema is the same for all."""
    dist = columns["distances"]
    table = pa.table({
        **scope_columns(scope or {}, len(dist)),
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


def confusion_entry(classes: list[str], matrix: np.ndarray) -> dict:
    """report.json's confusion: the matrix (rows true, columns predicted) up to MAX_MATRIX
    classes, else `confusion_pairs`: [true, predicted, images] for every non-zero cell, most
    frequent first."""
    if len(classes) <= MAX_MATRIX:
        return {"confusion": np.asarray(matrix).tolist()}
    found = sorted(cells(matrix), key=lambda c: -c[2])
    return {"confusion_pairs": [[classes[i], classes[j], n] for i, j, n in found]}


def mistakes(metric: dict, top: int = TOP_CONFUSIONS) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted, images) mistakes of a report's metric kept as
    `confusion_pairs` (see confusion_entry)."""
    return [tuple(p) for p in metric["confusion_pairs"] if p[0] != p[1]][:top]


def cells(matrix: np.ndarray) -> list[list[int]]:
    """A confusion matrix's non-zero cells as [true, predicted, images] (indices into the classes):
    at most one per image, however many classes."""
    matrix = np.asarray(matrix)
    t, p = np.nonzero(matrix)
    return [[int(i), int(j), int(matrix[i, j])] for i, j in zip(t, p)]


def dense(found: list[list[int]], n_classes: int) -> np.ndarray:
    """The confusion matrix of these cells."""
    matrix = np.zeros((n_classes, n_classes), np.int64)
    for i, j, n in found:
        matrix[i, j] += n
    return matrix


def stored_confusion(metric: dict, n_classes: int) -> np.ndarray:
    """The confusion matrix of an evaluation's metric, kept whole up to MAX_MATRIX classes and as
    `cells` beyond (see finish_evaluation)."""
    return np.asarray(metric["confusion"]) if "confusion" in metric else dense(metric["cells"], n_classes)
