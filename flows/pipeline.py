"""The pipeline: the order of the steps, written once.

archive -> unpacked members -> shards -> templates -> predictions -> report, then the run's
record and history row. The same function runs under the Prefect flow
(`pixelsim.flows.pixel_similarity`, with `PrefectRunner`) and without Prefect (`pixelsim.run`,
the tests and the benchmark, with `PlainRunner`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pixelsim.flows.datasets import DATASETS
from pixelsim.flows.runners import RETRIES, Runner
from pixelsim.storage.errors import DownloadError, MemberChanged, PixelsimError, shown
from pixelsim.storage.fetch import redact
from pixelsim.storage.history import record_run
from pixelsim.storage.layout import Layout
from pixelsim.storage.root import Root
from pixelsim.storage.sources import fingerprint
from pixelsim.tasks.contracts import Archive, Evaluation, Options, Report, Request, ShardSet, Templates, Tree
from pixelsim.tasks.convert import convert_shard, finish_shards, plan_shards
from pixelsim.tasks.download import download_archive, in_root
from pixelsim.tasks.evaluate import evaluate_shard, finish_evaluation, plan_evaluation
from pixelsim.tasks.report import write_report
from pixelsim.tasks.templates import compute_templates, torch_device
from pixelsim.tasks.untar import untar_archive

STEPS = ("download", "untar", "convert", "templates", "evaluate", "report")


@dataclass(frozen=True)
class Outputs:
    """The exact output of every step that a run used."""

    archive: Archive
    tree: Tree
    shards: ShardSet
    templates: Templates
    evaluation: Evaluation
    report: Report

    def folders(self) -> dict[str, str]:
        """Root-relative, so the record stays true when the root is moved or mounted elsewhere."""
        return {name: getattr(self, name).dir for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class RunResult:
    run_id: str
    request: Request
    outputs: Outputs
    cached: dict[str, bool]       # step -> every piece of it was reused from the root
    seconds: dict[str, float]
    record: str                   # the run's record in the root

    @property
    def report(self) -> dict[str, Any]:
        """The report JSON (`report` in what `pixelsim run --json` prints)."""
        return self.outputs.report.report

    def summary(self) -> dict[str, Any]:
        """What `pixelsim run --json` prints: the run's id and record, what each step reused and
        took, and the report (the same keys as `pixelsim show --json` where they overlap)."""
        return {"run_id": self.run_id, "record": self.record, "cached": self.cached, "seconds": self.seconds,
                "report_dir": self.report["artifacts"]["report"], "report": self.report}


def run_pipeline(request: Request, runner: Runner) -> RunResult:
    o = request.options
    if o.device != "cpu":
        torch_device(o.device)  # a missing GPU fails now, not after the download and convert
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    archive, source = fetch_source(runner, request)
    tree = runner.step("untar", untar_archive, archive)
    try:
        shards, layout = convert(runner, tree, request.dataset, o)
    except MemberChanged as e:   # the cached unpacking was damaged after it was published: redo it
        runner.log.warning("%s: %s; unpacking the archive again", tree.dir, e)
        tree = runner.step("untar", untar_archive, archive, refresh=True)
        shards, layout = convert(runner, tree, request.dataset, o)
    templates = runner.step("templates", compute_templates, shards, o.device)
    evaluation = evaluate(runner, shards, templates, o.device)
    report = runner.step("report", write_report, source, shards, templates, evaluation, o.metric, layout.notes)
    outputs = Outputs(archive, tree, shards, templates, evaluation, report)
    reused = [s for s in STEPS if runner.cached.get(s)]
    runner.log.info("reused cached results for %d of %d steps%s", len(reused), len(STEPS),
                    f" ({', '.join(reused)})" if reused else "")
    head = report.report["metrics"][o.metric]
    runner.log.info("%s: %s accuracy %s, balanced %s, overall %s; report: %s", request.dataset, o.metric,
                    ", ".join(f"{shown(c)} {a}" for c, a in head["per_class"].items()), head["balanced"], head["overall"],
                    report.report["artifacts"]["report"] + "/report.html")
    cached = {s: bool(runner.cached.get(s)) for s in STEPS}
    seconds = {s: round(runner.seconds.get(s, 0.0), 3) for s in STEPS}
    record = record_run(archive.root, runner.run_id, started, time.perf_counter() - clock, request=request_record(request),
                        options=o.to_dict(), outputs=outputs.folders(), report=report.report,
                        steps=[{"step": s, "seconds": seconds[s], "cached": cached[s]} for s in STEPS])
    return RunResult(runner.run_id, request, outputs, cached, seconds, record)


def convert(runner: Runner, tree: Tree, dataset: str, o: Options) -> tuple[ShardSet, Layout]:
    """The convert step: find the layout, plan the shards, build them (mapped), publish the set."""
    plan = plan_shards(tree, dataset, o)
    shards = finish_shards(plan, runner.map("convert", convert_shard, plan.jobs), dataset, tree.root, o.skip_bad)
    if shards.reused and not runner.cached.get("convert"):
        runner.log.info("reused %d shard(s), %d of %d images, from %s (same images by path and sha256); decoded "
                        "the other %d", shards.reused["shards"], shards.reused["images"], shards.images(),
                        shards.reused["from"], shards.images() - shards.reused["images"])
    if shards.skipped:
        runner.log.warning("skipped %d bad image file(s) (--skip-bad %d):\n  %s", len(shards.skipped), o.skip_bad,
                           "\n  ".join(shards.skipped))
    return shards, plan.layout


def evaluate(runner: Runner, shards: ShardSet, templates: Templates, device: str) -> Evaluation:
    """The evaluate step: one job per validation shard (mapped), then the metrics."""
    plan = plan_evaluation(shards, templates, device)
    return finish_evaluation(plan, templates, runner.map("evaluate", evaluate_shard, plan.jobs))


def request_record(request: Request) -> dict[str, Any]:
    """What the run was asked, as its record keeps it (credentials redacted)."""
    return {"dataset": request.dataset, "source": redact(request.source) if request.source else None,
            "sha256": request.sha256, "refresh": request.refresh}


def fetch_source(run: Runner, request: Request) -> tuple[Archive, dict]:
    """Download the explicit source, or the dataset's official one with the bundled copy as fallback;
    returns the archive and the report's `source`."""
    def described(a: Archive, **extra: Any) -> dict:
        return {"url": a.url, "sha256": a.sha256, "bytes": a.bytes, **extra}

    root = request.root
    if request.source:
        pins = {"sha256": request.sha256} if request.sha256 else {}
        local = "://" not in request.source or request.source.startswith("file://")
        if request.offline and not local and not in_root(root, request.source, pins):
            raise PixelsimError(f"--offline: downloading {redact(request.source)} needs the network (it is not in "
                                f"{root} under a --sha256 pin); run once online, or pin it with --sha256")
        fp = {}
        if not pins:
            try:
                fp = fingerprint(request.source, skip=Root(root).skip())
            except DownloadError as e:
                run.log.warning("could not fingerprint %s (%s); downloading anyway", e.url, e.reason)
        archive = run.step("download", download_archive, request.source, root, pins, 4, fp, offline=request.offline)
        return archive, described(archive)
    if request.dataset not in DATASETS:
        raise PixelsimError(f"unknown dataset {request.dataset!r}: pass --source, or one of {', '.join(DATASETS)}")
    ds = DATASETS[request.dataset]
    bundled = ds.bundled_path()
    fallback = {"bundled": True, "note": f"official source {redact(ds.url)} unreachable; used the bundled copy"}
    if not request.refresh or request.offline:
        # the pins name the archive's folder: a root that holds it needs no network at all
        if in_root(root, ds.source_url(), ds.pins):
            try:
                archive = run.step("download", download_archive, ds.source_url(), root, ds.pins, 1,
                                   offline=request.offline)
                return archive, described(archive)
            except DownloadError as e:
                if not (request.offline and bundled):
                    raise
                run.log.warning("%s: falling back to the bundled copy %s", e, bundled)
        if bundled and in_root(root, bundled, ds.bundled_pins):
            archive = run.step("download", download_archive, bundled, root, ds.bundled_pins, 1)
            return archive, described(archive, **fallback)
    if request.offline and not bundled:
        raise PixelsimError(f"--offline: dataset {request.dataset} is not in {root} yet and downloading it needs the "
                            f"network ({redact(ds.source_url())}); run once online")
    if not request.offline:
        try:
            if bundled:   # an unreachable official source falls back at once, without a failed task run
                fingerprint(ds.source_url())
            archive = run.step("download", download_archive, ds.source_url(), root, ds.pins, 2 if bundled else 4,
                               retries=0 if bundled else RETRIES)
            return archive, described(archive)
        except DownloadError as e:
            if not bundled:
                raise
            run.log.warning("official source %s failed (%s): falling back to the bundled copy %s", e.url, e.reason,
                            bundled)
    archive = run.step("download", download_archive, bundled, root, ds.bundled_pins, 1)
    return archive, described(archive, **fallback)
