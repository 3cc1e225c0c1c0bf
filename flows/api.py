"""The Python API: run the pipeline in-process, and open a storage root to read its runs.

`run` needs no Prefect server (it uses the plain runner, cached through the root, like the
CLI's flow); `open` reads only the root: the history, each run's record and the outputs that
record names, checked against their manifests.
"""
from __future__ import annotations

import posixpath
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from pixelsim.storage import catalog
from pixelsim.storage.artifacts import TEMPLATES, parse_templates
from pixelsim.storage.errors import IntegrityError, PixelsimError
from pixelsim.storage.history import as_rows, read_history, read_run_record
from pixelsim.storage.root import Root, sha256_bytes
from pixelsim.storage.shards import iter_arrays
from pixelsim.tasks.contracts import Report, Request, default_root

if TYPE_CHECKING:
    import pandas as pd

    from pixelsim.flows.pipeline import RunResult


def run(dataset: str | None = None, source: str | None = None, root: str | None = None, *,
        sha256: str | None = None, refresh: bool = False, offline: bool = False, **options: Any) -> RunResult:
    """Run the whole pipeline in this process (no Prefect); `options` are `pixelsim.Options` fields."""
    from pixelsim.flows.pipeline import run_pipeline
    from pixelsim.flows.runners import PlainRunner

    request = Request.build(dataset=dataset, source=source, sha256=sha256, root=root or default_root(),
                            refresh=refresh, offline=offline, **options)
    from pixelsim.flows.checks import check_request

    check_request(request)
    Root(request.root).ensure()
    return run_pipeline(request, PlainRunner(request.refresh))


def open(root: str | None = None) -> Store:  # noqa: A001 - pixelsim.open(root) reads like open()
    return Store(root or default_root())


class Store:
    """A storage root, read-only: its runs and their outputs."""

    def __init__(self, root: str):
        self.root = Root(root)

    def runs(self) -> pd.DataFrame:
        """The run history, one row per run and metric, oldest first."""
        return read_history(self.root).to_pandas()

    def _rows(self) -> list[dict]:
        return as_rows(read_history(self.root).select(["run_id", "dataset", "time"]))

    def run(self, run_id: str) -> RunView:
        """A run by its id or a unique prefix of it."""
        found = {(r["run_id"], r["dataset"]) for r in self._rows() if r["run_id"].startswith(run_id)}
        if not found:
            raise PixelsimError(f"no run {run_id!r} in {self.root.uri(catalog.HISTORY)}")
        if len(found) > 1:
            raise PixelsimError(f"run id prefix {run_id!r} is ambiguous: {', '.join(sorted(r for r, _ in found))}")
        (rid, dataset), = found
        return RunView(self.root, read_run_record(self.root, dataset, rid))

    def latest(self, dataset: str | None = None) -> RunView:
        """The last run (of `dataset`, when given) that recorded itself in this root."""
        rows = [r for r in self._rows() if dataset is None or r["dataset"] == dataset]
        if not rows:
            what = f"of dataset {dataset!r} " if dataset else ""
            raise PixelsimError(f"no run {what}recorded under {self.root.uri(catalog.HISTORY)}: run pixelsim first")
        last = max(rows, key=lambda r: (r["time"], r["run_id"]))
        return RunView(self.root, read_run_record(self.root, last["dataset"], last["run_id"]))


class RunView:
    """One run's record, and the outputs it names."""

    def __init__(self, root: Root, record: dict):
        self.root, self.record = root, record

    def __repr__(self) -> str:
        return f"<pixelsim run {self.run_id} of {self.dataset} at {self.record['time']}>"

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def dataset(self) -> str:
        return self.record["dataset"]

    @property
    def options(self) -> dict:
        return self.record["options"]

    def folder(self, step: str) -> str:
        """The output folder of `step` (archive, tree, shards, templates, evaluation, report), root-relative."""
        outputs = self.record["outputs"]
        if step not in outputs:
            raise PixelsimError(f"step {step!r}: use one of {', '.join(outputs)}")
        return outputs[step]

    def _manifest(self, step: str) -> dict:
        """The step folder's manifest, sealed and naming this folder as its own (not another output's copy)."""
        folder = self.folder(step)
        manifest = self.root.manifest(folder)
        record = manifest.get("record")
        if not isinstance(record, dict) or record.get("dir") != folder:
            raise IntegrityError(f"{self.root.uri(folder)}: holds the output of "
                                 f"{record.get('dir') if isinstance(record, dict) else None}, not its own")
        return manifest

    def _verified(self, step: str, name: str, manifest: dict | None = None) -> bytes:
        """The bytes of file `name` of the step's folder, once they match its manifest: a damaged
        file is an IntegrityError naming it, never data."""
        manifest = manifest or self._manifest(step)
        rel = posixpath.join(self.folder(step), name)
        entry = next((f for f in manifest["files"] if f["name"] == name), None)
        if entry is None:
            raise IntegrityError(f"{self.root.uri(rel)}: not listed in its folder's manifest")
        try:
            data = self.root.read_bytes(rel)
        except FileNotFoundError:
            raise IntegrityError(f"{self.root.uri(rel)}: listed in the manifest but missing; "
                                 "pixelsim run with the same options rebuilds it") from None
        except (IsADirectoryError, NotADirectoryError):
            raise IntegrityError(f"{self.root.uri(rel)}: not a file; pixelsim run with the same options rebuilds it") from None
        if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
            raise IntegrityError(f"{self.root.uri(rel)}: does not match its manifest (altered or truncated); "
                                 "pixelsim run with the same options rebuilds it")
        return data

    @cached_property
    def report(self) -> dict:
        """report.json, verified against its folder's manifest (IntegrityError if damaged)."""
        return Report.load(self.root.url, self.folder("report")).report

    def templates(self) -> dict[str, np.ndarray]:
        """Class name -> template, float32 in [0, 1], shaped like one image."""
        classes, means, shape = parse_templates(self._verified("templates", TEMPLATES))
        return {c: np.asarray(m, np.float32).reshape(shape) for c, m in zip(classes, means)}

    def predictions(self) -> pd.DataFrame:
        """Every validation image's prediction by both metrics (columns as in predictions-*.parquet)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        manifest = self._manifest("evaluation")
        files = sorted(f["name"] for f in manifest["files"] if f["name"].startswith("predictions-"))
        tables = [pq.ParquetFile(pa.BufferReader(self._verified("evaluation", name, manifest))).read() for name in files]
        return pa.concat_tables(tables).to_pandas()

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(images uint8 N x H x W [x C], labels int64 N, classes) of the train or valid split,
        straight from the shards (each checked against its manifest digest)."""
        record = self._manifest("shards")["record"]
        if split not in record["shards"]:
            raise PixelsimError(f"split {split!r}: use one of {', '.join(record['shards'])}")
        files = record["shards"][split]
        batches = list(iter_arrays(self.root, files, sha256=record["sha256"]))
        shape = tuple(record["shape"])
        images = (np.concatenate([b["image"] for b in batches]) if batches
                  else np.zeros((0, int(np.prod(shape))), np.uint8))
        labels = (np.concatenate([b["label_index"] for b in batches]) if batches else np.zeros(0)).astype(np.int64)
        return images.reshape(-1, *shape), labels, list(record["classes"])
