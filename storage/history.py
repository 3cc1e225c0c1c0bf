"""What each run did: its record (`runs/<dataset>/<run id>.json`: what it was asked, its options
and the exact output folders it used) and its history file (`history/`), one row per metric.

One file per run, never a shared file rewritten in place: concurrent runs cannot lose each
other's rows, no lock is needed (object stores have none to offer), and the folder reads as
one table with pyarrow/pandas (`history/`), DuckDB or Polars (`history/*.parquet`). Each
file is written under a `_`-prefixed temporary name, which dataset readers and `*.parquet`
globs skip, then renamed into place.
"""
from __future__ import annotations

import io
import json
import logging
import posixpath
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from pixelsim.storage import catalog
from pixelsim.storage.catalog import HISTORY
from pixelsim.storage.errors import IntegrityError
from pixelsim.storage.root import Root, seal_ok, sealed
from pixelsim.storage.tables import table_digest

OPTIONS = pa.struct([("shard_size", pa.int64()), ("channels", pa.int64()), ("resize", pa.list_(pa.int64())),
                     ("exact_resize", pa.bool_()),
                     ("classes", pa.list_(pa.string())), ("train_split", pa.string()),
                     ("valid_split", pa.string()), ("skip_bad", pa.int64()), ("device", pa.string())])
STEP_OUTPUTS = ("archive", "tree", "shards", "templates", "evaluation", "report")

SCHEMA = pa.schema([
    ("run_id", pa.string()),                 # the Prefect flow run id
    ("time", pa.timestamp("us", tz="UTC")),  # when the run started
    ("dataset", pa.string()),
    ("source_url", pa.string()),
    ("source_sha256", pa.string()),
    ("metric", pa.string()),
    ("headline", pa.bool_()),                # the run's --metric
    ("balanced", pa.float64()),
    ("overall", pa.float64()),
    ("per_class", pa.list_(pa.struct([("class", pa.string()), ("accuracy", pa.float64())]))),
    ("steps", pa.list_(pa.struct([("step", pa.string()), ("seconds", pa.float64()), ("cached", pa.bool_())]))),
    ("total_seconds", pa.float64()),         # the whole run, wall clock
    ("report", pa.string()),                 # the report folder
    ("options", OPTIONS),                    # the run's options (besides metric)
    ("outputs", pa.struct([(k, pa.string()) for k in STEP_OUTPUTS])),  # each step's output folder
])


def history_rows(run_id: str, started: datetime, report: dict, steps: list[dict], seconds: float,
                 options: dict | None = None, outputs: dict | None = None) -> list[dict]:
    """A run's rows (one per metric) from its report JSON, step timings, options and outputs."""
    src = report["source"]
    opts = {k: (options or {}).get(k) for k in OPTIONS.names}
    return [{"run_id": run_id, "time": started.astimezone(timezone.utc), "dataset": report["dataset"],
             "source_url": src.get("url"), "source_sha256": src.get("sha256"), "metric": name,
             "headline": name == report["metric"], "balanced": m["balanced"], "overall": m["overall"],
             "per_class": [{"class": c, "accuracy": m["per_class"].get(c)} for c in report["classes"]],
             "steps": [{"step": s["step"], "seconds": float(s["seconds"]), "cached": bool(s["cached"])}
                       for s in steps],
             "total_seconds": round(float(seconds), 3), "report": report["artifacts"]["report"],
             "options": opts, "outputs": {k: (outputs or {}).get(k) for k in STEP_OUTPUTS}}
            for name, m in report["metrics"].items()]


def record_run(root_url: str, run_id: str, started: datetime, seconds: float, *, request: dict, options: dict,
               outputs: dict[str, str], report: dict, steps: list[dict]) -> str:
    """Publish the run's record, then its history rows; returns the record's path in the root."""
    root = Root(root_url)
    rel = catalog.run_record(report["dataset"], run_id)
    body = {"run_id": run_id, "time": started.astimezone(timezone.utc).isoformat(), "seconds": round(seconds, 3),
            "dataset": report["dataset"], "source": report["source"], "request": request, "options": options,
            "outputs": outputs, "steps": steps, "report": report["artifacts"]["report"]}
    root.write_bytes_atomic(rel, (json.dumps(sealed(body), indent=1) + "\n").encode())
    append_run(root, history_rows(run_id, started, report, steps, seconds, options, outputs))
    return rel


def read_run_record(root: Root, dataset: str, run_id: str) -> dict:
    """The run's record, sealed like a manifest: a changed byte, a foreign or older file is an
    IntegrityError, which callers treat like a missing record."""
    rel = catalog.run_record(dataset, run_id)
    try:
        body = root.read_json(rel)
    except FileNotFoundError:
        raise IntegrityError(f"{root.uri(rel)}: the run record is missing (its history row is there)") from None
    except (OSError, ValueError) as e:   # a folder in its place, cut short, not JSON, not UTF-8
        raise IntegrityError(f"{root.uri(rel)}: not a run record of this pixelsim (unreadable: "
                             f"{e.strerror if isinstance(e, OSError) else e})") from None
    if not seal_ok(body) or any(not isinstance(body.get(k, {}), dict) for k in ("source", "request", "options", "outputs")):
        raise IntegrityError(f"{root.uri(rel)}: not a run record of this pixelsim (altered, foreign, or written by an "
                             "older version)")
    return {k: v for k, v in body.items() if k != "digest"}


def file_name(run_id: str, started: datetime) -> str:
    """Sorts by start time; no colons, so it is a valid name on every filesystem and object store."""
    stamp = started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{stamp}-{run_id}.parquet"


def rows_table(rows: list[dict]) -> pa.Table:
    """The rows as a table, through Arrow's JSON reader: building arrays from Python objects makes
    pyarrow import pandas, 0.6 s of a fully cached run that needs nothing else from it."""
    lines = (json.dumps({**r, "time": r["time"].astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
             for r in rows)
    options = pj.ParseOptions(explicit_schema=SCHEMA, unexpected_field_behavior="error")
    return pj.read_json(io.BytesIO("\n".join(lines).encode()), parse_options=options)


def append_run(root: Root, rows: list[dict]) -> str:
    """Publish the run's history file; returns its path relative to the root."""
    if not rows:
        raise ValueError("a run has at least one metric row")
    rel = posixpath.join(HISTORY, file_name(rows[0]["run_id"], rows[0]["time"]))
    table = rows_table(rows)
    sealed_table = table.replace_schema_metadata({SEAL: table_digest(_parquet_table(_parquet_bytes(table)))})
    root.write_bytes_atomic(rel, _parquet_bytes(sealed_table), posixpath.join(HISTORY, f"_tmp-{uuid.uuid4().hex}"))
    return rel


MAX_FILE_BYTES = 64 << 20   # one run's rows: a few KB, or a few MB for thousands of classes
SEAL = b"pixelsim.rows_sha256"   # schema metadata: the digest of the file's rows, as they read back


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _parquet_table(data: bytes) -> pa.Table:
    return pq.ParquetFile(pa.BufferReader(data)).read()


def history_files(root: Root) -> list[str]:
    """Published history files, oldest first (temporary `_tmp-*` files are not listed)."""
    return [p for p in root.glob(posixpath.join(HISTORY, "*.parquet")) if not posixpath.basename(p).startswith(("_", "."))]


def _read(root: Root, rel: str) -> pa.Table | None:
    """One run's rows; None, with a warning naming the file, when it cannot be read or does not
    check out (a damaged, foreign or older file must not hide every other run, nor show as
    figures): its schema must be SCHEMA and its rows must match their seal."""
    try:
        table = _parquet_table(root.read_bytes(rel, limit=MAX_FILE_BYTES))   # a FIFO or /dev/zero: damage
        if not table.schema.remove_metadata().equals(SCHEMA):
            raise ValueError("not a history file of this pixelsim (other columns or types)")
        if (table.schema.metadata or {}).get(SEAL, b"").decode("ascii", "replace") != table_digest(table):
            raise ValueError("its rows do not match their seal (altered, or written by an older pixelsim)")
        return table.replace_schema_metadata(None)
    except (OSError, ValueError, pa.ArrowException, IntegrityError) as e:
        if rel not in _warned:   # once per process, however often the history is read
            _warned.add(rel)
            logging.getLogger("pixelsim").warning("history file %s skipped: unreadable (%s)", root.uri(rel), e)
        return None


_warned: set[str] = set()


def read_history(root: Root) -> pa.Table:
    """Every run's rows, oldest first; an empty table when nothing was recorded."""
    tables = [t for t in (_read(root, rel) for rel in history_files(root)) if t is not None]
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables, promote_options="default")
    return table.sort_by([("time", "ascending"), ("run_id", "ascending"), ("metric", "ascending")])


def as_rows(table: pa.Table) -> list[dict]:
    """The table's rows as dicts, `time` an aware UTC datetime. (pyarrow's own conversion of a
    time-zoned column imports pandas: 0.3 s of a run that needs nothing else from it.)"""
    if "time" in table.column_names:
        table = table.set_column(table.schema.get_field_index("time"), "time", table["time"].cast(pa.timestamp("us")))
    rows = table.to_pylist()
    for r in rows:
        if r.get("time") is not None:
            r["time"] = r["time"].replace(tzinfo=timezone.utc)
    return rows


def recent_rows(root: Root, dataset: str, metric: str, runs: int) -> list[dict]:
    """The rows of the last `runs` runs of `dataset` with `metric`, oldest first, reading history
    files from the newest back until enough are found (not the whole history)."""
    found: list[dict] = []
    for rel in reversed(history_files(root)):
        table = _read(root, rel)
        found += [r for r in as_rows(table) if r["dataset"] == dataset and r["metric"] == metric] if table else []
        if len(found) >= runs:
            break
    return sorted(found, key=lambda r: (r["time"], r["run_id"]))[-runs:]
