"""The pixel-similarity flow: wiring only; every step's work lives in `tasks`."""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.datasets import DATASETS
from storage.errors import DownloadError, IntegrityError, PixelsimError
from storage.fetch import redact
from storage.history import append_run, history_rows
from storage.layout import find_layout
from storage.root import Root, verify_output
from storage.sources import fingerprint
from tasks.convert import BadImages, convert, finish_shards, plan_shards, tree_listing
from tasks.download import download
from tasks.evaluate import METRICS, evaluate, evaluation_dir, finish_evaluation
from tasks.report import render_markdown, report
from tasks.templates import templates
from tasks.untar import untar

STEPS = ("download", "untar", "convert", "templates", "evaluate", "report")


class Steps:
    """Runs steps, remembering which were cache hits and how long each took, and recomputes hits
    whose files are gone."""

    def __init__(self, refresh: bool):
        self.refresh = refresh
        self.cached: dict[str, bool] = {}
        self.seconds: dict[str, float] = {}

    def _took(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def __call__(self, t: Any, *args: Any, **kwargs: Any) -> dict:
        start = time.perf_counter()
        if self.refresh:
            t = t.with_options(refresh_cache=True)
        state = t(*args, return_state=True, **kwargs)
        out = state.result()
        hit = state.name == "Cached"
        if hit:
            try:
                verify_output(out)
            except IntegrityError as e:
                get_run_logger().warning("%s: cached result no longer valid (%s); recomputing", t.name, e)
                out = t.with_options(refresh_cache=True)(*args, **kwargs)
                hit = False
        self.cached[t.name] = hit
        self._took(t.name, start)
        return out

    def map(self, t: Any, args: list[tuple], names: list[str], **kwargs: Any) -> list[dict]:
        """One task run per tuple of positional `args` (named `names[i]`), run concurrently on
        the flow's task runner.

        Failures are gathered, so bad images from every shard are reported together.
        """
        start = time.perf_counter()
        fresh = t.with_options(refresh_cache=True)
        first = fresh if self.refresh else t
        futures = [first.with_options(task_run_name=n).submit(*a, **kwargs) for a, n in zip(args, names)]
        outs, hits, failures = [], [], []
        for a, name, future in zip(args, names, futures):
            future.wait()
            state = future.state
            if not state.is_completed():
                failures.append(state.result(raise_on_failure=False))
                continue
            out, hit = state.result(), state.name == "Cached"
            if hit:
                try:
                    verify_output(out)
                except IntegrityError as e:
                    get_run_logger().warning("%s: cached result no longer valid (%s); recomputing", name, e)
                    out, hit = fresh.with_options(task_run_name=name)(*a, **kwargs), False
            outs.append(out)
            hits.append(hit)
        if failures:
            bad = [e for f in failures if isinstance(f, BadImages) for e in f.errors]
            if bad:
                raise BadImages(bad)
            raise failures[0] if isinstance(failures[0], BaseException) else PixelsimError(str(failures[0]))
        self.cached[t.name] = all(hits)
        self._took(t.name, start)
        return outs


def artifact_key(dataset: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only; stable per dataset."""
    return re.sub(r"[^a-z0-9-]+", "-", f"pixelsim-{dataset}-{what}".lower()).strip("-")


def fetch_source(run: Steps, dataset: str, source: str | None, root: str,
                 sha256: str | None = None) -> tuple[dict, dict]:
    """Download the explicit source, or the dataset's official one with the bundled copy as fallback."""
    log = get_run_logger()
    if source:
        try:
            fp = fingerprint(source)
        except DownloadError as e:
            log.warning("could not fingerprint %s (%s); downloading anyway", e.url, e.reason)
            fp = {}
        archive = run(download, source, root, {"sha256": sha256.lower()} if sha256 else {}, 4, fp)
        return archive, {"url": archive["url"], "sha256": archive["sha256"], "bytes": archive["bytes"]}
    if dataset not in DATASETS:
        raise PixelsimError(f"unknown dataset {dataset!r}: pass --source, or one of {', '.join(DATASETS)}")
    ds = DATASETS[dataset]
    bundled = ds.bundled_path()
    try:
        url = ds.source_url()
        fp = fingerprint(url)
        quick = download.with_options(retries=0) if bundled else download
        archive = run(quick, url, root, ds.pins, 2 if bundled else 4, fp)
        return archive, {"url": archive["url"], "sha256": archive["sha256"], "bytes": archive["bytes"]}
    except DownloadError as e:
        if not bundled:
            raise
        log.warning("official source %s failed (%s): falling back to the bundled copy %s", e.url, e.reason, bundled)
    archive = run(download, bundled, root, ds.bundled_pins, 1, fingerprint(bundled))
    return archive, {"url": archive["url"], "sha256": archive["sha256"], "bytes": archive["bytes"],
                     "bundled": True,
                     "note": f"official source {redact(ds.url)} unreachable; used the bundled copy"}


@flow(name="pixel-similarity", log_prints=False)
def pixel_similarity(dataset: str = "mnist_sample", source: str | None = None, root: str = "pixelsim-data",
                     metric: str = "l1", refresh: bool = False, shard_size: int = 5000, channels: int = 1,
                     resize: list[int] | None = None, classes: list[str] | None = None,
                     train_split: str | None = None, valid_split: str | None = None,
                     device: str = "cpu", sha256: str | None = None, skip_bad: int = 0) -> dict:
    """Archive -> extracted tree -> shards -> templates -> predictions -> report."""
    if metric not in METRICS:
        raise PixelsimError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    log = get_run_logger()
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    run = Steps(refresh)
    archive, src = fetch_source(run, dataset, source, root, sha256)
    tree = run(untar, archive, root)
    entries, folders = tree_listing(Root(root), tree)
    layout = find_layout(list(entries), folders=folders, train_split=train_split,
                         valid_split=valid_split, classes=classes)
    plan = plan_shards(tree, layout.to_dict(), dataset, root, shard_size, channels, resize)
    done = run.map(convert, [(p,) for p in plan["plans"]], [p["name"] for p in plan["plans"]], tree=tree,
                   classes=plan["classes"], shape=plan["shape"], root=root, channels=channels, resize=bool(resize),
                   skip_bad=skip_bad > 0)
    shards = finish_shards(plan, done, root, skip_bad)
    if shards["skipped"]:
        log.warning("skipped %d bad image file(s) (--skip-bad %d):\n  %s", len(shards["skipped"]), skip_bad,
                    "\n  ".join(shards["skipped"]))
    tmpl = run(templates, shards, root, device)
    out_dir = evaluation_dir(shards, tmpl)
    valid = shards["shards"]["valid"]
    parts = run.map(evaluate, [(v, shards["sha256"][v]) for v in valid],
                    [f"evaluate-{i:05d}" for i in range(len(valid))], templates=tmpl, out_dir=out_dir, root=root,
                    device=device)
    ev = finish_evaluation(out_dir, tmpl["classes"], parts, root)
    rep = run(report, dataset, src, shards, tmpl, ev, metric, layout.notes, root)
    result = rep["report"]
    reused = [s for s in STEPS if run.cached.get(s)]
    log.info("reused cached results for %d of %d steps%s", len(reused), len(STEPS),
             f" ({', '.join(reused)})" if reused else "")
    publish_artifacts(dataset, result, run.cached)
    run_id = str(flow_run.id)
    steps = [{"step": s, "seconds": round(run.seconds.get(s, 0.0), 3), "cached": bool(run.cached.get(s))}
             for s in STEPS]
    append_run(Root(root), history_rows(run_id, started, result, steps, time.perf_counter() - clock))
    return {"report": result, "cached": run.cached, "run_id": run_id}


def publish_artifacts(dataset: str, report: dict, cached: dict[str, bool]) -> None:
    """The run's summary in the Prefect UI: the Markdown report and a per-class table."""
    steps = ", ".join(f"{s}: {'cached' if cached.get(s) else 'computed'}" for s in STEPS)
    create_markdown_artifact(key=artifact_key(dataset, "report"),
                             markdown=render_markdown(report) + f"\nSteps: {steps}\n",
                             description=f"pixel-similarity report for {dataset}")
    rows = [{"class": c, "train": report["counts"]["train"].get(c, 0), "valid": report["counts"]["valid"].get(c, 0),
             **{f"{m} accuracy": report["metrics"][m]["per_class"][c] for m in report["metrics"]}}
            for c in report["classes"]]
    create_table_artifact(key=artifact_key(dataset, "accuracy"), table=rows,
                          description=f"per-class accuracy for {dataset}")
