"""The pixel-similarity flow: wiring only; every step's work lives in `tasks`."""
from __future__ import annotations

import base64
import posixpath
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.futures import as_completed
from prefect.runtime import flow_run
from pydantic import SecretStr

from flows.datasets import DATASETS
from flows.progress import notify
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
from tasks.templates import templates, torch_device
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

    @staticmethod
    def _checked(state: Any, name: str, recompute: Callable[[], dict]) -> tuple[dict, bool]:
        """(result, was a cache hit): a hit whose files fail `verify_output` is recomputed."""
        out = state.result()
        if state.name != "Cached":
            return out, False
        try:
            verify_output(out)
            return out, True
        except IntegrityError as e:
            get_run_logger().warning("%s: cached result no longer valid (%s); recomputing", name, e)
            return recompute(), False

    def __call__(self, t: Any, *args: Any, **kwargs: Any) -> dict:
        start = time.perf_counter()
        if self.refresh:
            t = t.with_options(refresh_cache=True)
        state = t(*args, return_state=True, **kwargs)
        out, hit = self._checked(state, t.name, lambda: t.with_options(refresh_cache=True)(*args, **kwargs))
        self.cached[t.name] = hit
        self._took(t.name, start)
        return out

    def map(self, t: Any, args: list[tuple], names: list[str], *,
            on_done: Callable[[int, int], None] | None = None, **kwargs: Any) -> list[dict]:
        """One task run per tuple of positional `args` (named `names[i]`), run concurrently on
        the flow's task runner; `on_done(finished, total)` follows them in completion order.

        Failures are gathered, so bad images from every shard are reported together.
        """
        start = time.perf_counter()
        fresh = t.with_options(refresh_cache=True)
        first = fresh if self.refresh else t
        futures = [first.with_options(task_run_name=n).submit(*a, **kwargs) for a, n in zip(args, names)]
        if on_done:
            on_done(0, len(futures))
            for n, _ in enumerate(as_completed(futures), 1):
                on_done(n, len(futures))
        outs, hits, failures = [], [], []
        for a, name, future in zip(args, names, futures):
            future.wait()
            state = future.state
            if not state.is_completed():
                failures.append(state.result(raise_on_failure=False))
                continue
            out, hit = self._checked(state, name, lambda: fresh.with_options(task_run_name=name)(*a, **kwargs))
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


def masked_source(source: str | None) -> str | SecretStr | None:
    """A source URL carrying credentials, as a SecretStr: Prefect then records the flow run's
    `source` parameter as '**********' instead of storing the credentials in its database."""
    return SecretStr(source) if source and redact(source) != source else source


@flow(name="pixel-similarity", log_prints=False)
def pixel_similarity(dataset: str = "mnist_sample", source: str | SecretStr | None = None, root: str = "pixelsim-data",
                     metric: str = "l1", refresh: bool = False, shard_size: int = 5000, channels: int = 1,
                     resize: list[int] | None = None, classes: list[str] | None = None,
                     train_split: str | None = None, valid_split: str | None = None,
                     device: str = "cpu", sha256: str | None = None, skip_bad: int = 0) -> dict:
    """Archive -> extracted tree -> shards -> templates -> predictions -> report."""
    if isinstance(source, SecretStr):  # see masked_source
        source = source.get_secret_value()
    if metric not in METRICS:
        raise PixelsimError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if device != "cpu":
        torch_device(device)  # a missing GPU fails now, not after the download and convert
    log = get_run_logger()
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    run = Steps(refresh)
    archive, src = fetch_source(run, dataset, source, root, sha256)
    tree = run(untar, archive, root)
    entries, folders = tree_listing(Root(root), tree)
    layout = find_layout(list(entries), folders=folders, train_split=train_split,
                         valid_split=valid_split, classes=classes)
    plan = plan_shards(tree, layout.to_dict(), dataset, root, shard_size, channels, resize, entries)
    done = run.map(convert, [(p,) for p in plan["plans"]], [p["name"] for p in plan["plans"]], tree=tree,
                   classes=plan["classes"], shape=plan["shape"], root=root, channels=channels, resize=bool(resize),
                   skip_bad=skip_bad > 0, on_done=ConvertProgress(dataset))
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
    publish_artifacts(dataset, result, run.cached, tmpl)
    run_id = str(flow_run.id)
    steps = [{"step": s, "seconds": round(run.seconds.get(s, 0.0), 3), "cached": bool(run.cached.get(s))}
             for s in STEPS]
    append_run(Root(root), history_rows(run_id, started, result, steps, time.perf_counter() - clock))
    return {"report": result, "cached": run.cached, "run_id": run_id}


class ConvertProgress:
    """Convert progress as shards finish: a progress artifact in the UI, a bar on a terminal."""

    def __init__(self, dataset: str):
        self.dataset, self.id, self.shown = dataset, None, -1.0

    def __call__(self, done: int, total: int) -> None:
        pct = round(100.0 * done / total, 1) if total else 100.0
        text = f"{done} of {total} shards converted"
        if self.id is None:
            self.id = create_progress_artifact(pct, key=artifact_key(self.dataset, "convert-progress"),
                                               description=text)
        elif pct >= self.shown + 1 or done == total:  # whole percents: one API call each at most
            update_progress_artifact(self.id, pct, description=text)
        else:
            pct = self.shown
        self.shown = pct
        notify("convert", done, total)


TEMPLATE_WIDTH = 112   # pixels on screen: a 28x28 template at 4x
MAX_INLINE = 256_000   # bytes of PNG per template; larger ones are only linked


def template_images(tmpl: dict, per_row: int = 10) -> list[str]:
    """Markdown tables of the class templates as data: URIs: the UI fetches nothing from a storage
    root, and an image artifact takes only a URL a browser can reach."""
    root, out = Root(tmpl["root"]), ["", "## Templates", ""]
    classes = tmpl["classes"]
    for i in range(0, len(classes), per_row):
        cells = []
        for c in classes[i:i + per_row]:
            png = root.read_bytes(posixpath.join(tmpl["dir"], f"{c}.png"))
            if len(png) > MAX_INLINE:
                return []
            cells.append(f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" '
                         f'width="{TEMPLATE_WIDTH}" alt="template of {c}" title="{c}">')
        out += ["| " + " | ".join(classes[i:i + per_row]) + " |", "|" + "---|" * len(cells),
                "| " + " | ".join(cells) + " |", ""]
    return out


def output_links(report: dict) -> dict[str, str]:
    """Where each output lives, as a URL (file:// for a local root); predictions are a glob in
    their folder, so the folder is linked."""
    out = {}
    for what, uri in report["artifacts"].items():
        folder = posixpath.dirname(uri) if "*" in uri else uri
        out[what] = folder if "://" in folder else Path(folder).as_uri()
    return out


def publish_artifacts(dataset: str, report: dict, cached: dict[str, bool], tmpl: dict | None = None) -> None:
    """The run's summary in the Prefect UI: the Markdown report with the templates, the steps
    cached and links to the outputs, a per-class table, and a link to the report folder."""
    head = report["metrics"][report["metric"]]
    summary = (f"{report['metric']} balanced {head['balanced']} "
               f"({', '.join(f'{c}: {a}' for c, a in head['per_class'].items())})")
    links = output_links(report)
    extra = ["", "## Steps", "", "| step | result |", "|---|---|",
             *[f"| {s} | {'cached' if cached.get(s) else 'computed'} |" for s in STEPS],
             "", "## Links", "", *[f"- [{what}]({url})" for what, url in links.items()], ""]
    create_markdown_artifact(key=artifact_key(dataset, "report"),
                             markdown=render_markdown(report) + "\n".join((template_images(tmpl) if tmpl else []) + extra),
                             description=f"{summary}: pixel-similarity report for {dataset}")
    rows = [{"class": c, "train": report["counts"]["train"].get(c, 0), "valid": report["counts"]["valid"].get(c, 0),
             **{f"{m} accuracy": report["metrics"][m]["per_class"][c] for m in report["metrics"]}}
            for c in report["classes"]]
    create_table_artifact(key=artifact_key(dataset, "accuracy"), table=rows,
                          description=f"per-class accuracy for {dataset}")
    create_link_artifact(links["report"], link_text=report["artifacts"]["report"],
                         key=artifact_key(dataset, "report-folder"),
                         description=f"the report files of this {dataset} run in the storage root")
