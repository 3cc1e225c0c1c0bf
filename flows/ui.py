"""What a run shows in the Prefect UI: its artifacts (report, accuracy table, report folder) and
the convert step's progress. Called by the flow only; the pipeline knows nothing of it."""
from __future__ import annotations

import base64
import posixpath
import re
from pathlib import Path

from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)

from pixelsim.flows.pipeline import STEPS
from pixelsim.flows.progress import notify
from pixelsim.storage.root import Root
from pixelsim.tasks.contracts import Templates
from pixelsim.tasks.report import render_markdown


def artifact_key(dataset: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only; stable per dataset."""
    return re.sub(r"[^a-z0-9-]+", "-", f"pixelsim-{dataset}-{what}".lower()).strip("-")


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


def template_images(tmpl: Templates, per_row: int = 10) -> list[str]:
    """Markdown tables of the class templates as data: URIs: the UI fetches nothing from a storage
    root, and an image artifact takes only a URL a browser can reach."""
    root, out = Root(tmpl.root), ["", "## Templates", ""]
    classes = tmpl.classes
    for i in range(0, len(classes), per_row):
        cells = []
        for c in classes[i:i + per_row]:
            png = root.read_bytes(posixpath.join(tmpl.dir, f"{c}.png"))
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


def publish_artifacts(dataset: str, report: dict, cached: dict[str, bool], tmpl: Templates | None = None) -> None:
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
