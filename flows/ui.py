"""What a run shows in the Prefect UI: its artifacts (report, accuracy table, report folder) and
the convert step's progress. Called by the flow only; the pipeline knows nothing of it."""
from __future__ import annotations

import base64
import html
import posixpath
import re
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)

from pixelsim.flows.pipeline import STEPS, RunResult
from pixelsim.flows.progress import notify
from pixelsim.storage import catalog
from pixelsim.storage.artifacts import MAX_MATRIX, MAX_PICTURES
from pixelsim.storage.history import recent_rows
from pixelsim.storage.root import Root, digest_json
from pixelsim.tasks.contracts import Request, Templates
from pixelsim.tasks.report import md, render_markdown


def artifact_prefix(request: Request) -> str:
    """`pixelsim-<dataset>-<metric>-<root>`: the UI keeps one history per dataset, metric and storage
    root, so runs into another root or with another headline metric never overwrite it."""
    return f"pixelsim-{request.dataset}-{request.options.metric}-{digest_json(Root(request.root).uri(''))[:6]}"


def artifact_key(prefix: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{what}".lower()).strip("-")


class ConvertProgress:
    """Convert progress as shards finish: a progress artifact in the UI, a bar on a terminal. Shown
    only once a shard is actually built: a run whose shards are all reused shows none."""

    def __init__(self, prefix: str):
        self.prefix, self.id, self.shown, self.started = prefix, None, -1.0, False

    def __call__(self, done: int, total: int, computed: bool = True) -> None:
        self.started = self.started or (computed and done > 0)
        if not self.started:
            return
        pct = round(100.0 * done / total, 1) if total else 100.0
        text = f"{done} of {total} shards converted"
        if self.id is None:
            self.id = create_progress_artifact(pct, key=artifact_key(self.prefix, "convert-progress"),
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
    classes = tmpl.classes[:MAX_PICTURES]
    if len(tmpl.classes) > MAX_PICTURES:
        out += [f"The first {MAX_PICTURES} of {len(tmpl.classes)} classes; every template is a PNG in "
                f"{place(tmpl.uri())}.", ""]
    pictures = catalog.template_images(tmpl.classes)
    for i in range(0, len(classes), per_row):
        cells = []
        for c, picture in zip(classes[i:i + per_row], pictures[i:i + per_row]):
            png = root.read_bytes(posixpath.join(tmpl.dir, picture))
            if len(png) > MAX_INLINE:
                return []
            name = html.escape(c, quote=True)
            cells.append(f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" '
                         f'width="{TEMPLATE_WIDTH}" alt="template of {name}" title="{name}">')
        out += ["| " + " | ".join(map(md, classes[i:i + per_row])) + " |", "|" + "---|" * len(cells),
                "| " + " | ".join(cells) + " |", ""]
    return out


def output_places(report: dict) -> dict[str, str]:
    """Where each output lives (predictions are a glob in their folder, so the folder is given)."""
    return {what: posixpath.dirname(uri) if "*" in uri else uri for what, uri in report["artifacts"].items()}


def place(uri: str) -> str:
    """Markdown for a place: a link a browser can open (http, https), else the plain path or URL in
    code (a browser refuses file:// links from a web page, and has no s3:// at all)."""
    return f"[{uri}]({uri})" if uri.startswith(("http://", "https://")) else f"`{uri}`"


HISTORY_RUNS = 10   # runs in the history table


def history_table(rows: list[dict], limit: int = HISTORY_RUNS) -> list[dict]:
    """The last runs of `rows` (a dataset's history rows of one metric, oldest first), newest
    first, each with the change in balanced accuracy since the run before it. Class columns are
    `class <name>`, so no class name can take the place of a fixed column."""
    out = []
    for prev, row in zip([None, *rows], rows):
        change = None if prev is None else round(row["balanced"] - prev["balanced"], 4)
        per_class = row["per_class"] if len(row["per_class"]) <= MAX_MATRIX else []   # a column per class, if few
        out.append({"time": f"{row['time']:%Y-%m-%d %H:%M:%S}", "run": row["run_id"][:8], "balanced": row["balanced"],
                    "change": change, **{f"class {p['class']}": p["accuracy"] for p in per_class},
                    "cached steps": sum(s["cached"] for s in row["steps"]), "seconds": row["total_seconds"]})
    return out[1:][::-1] if len(rows) > limit else out[::-1]


def changes_since_last_run(request: Request, run_id: str, rows: list[dict]) -> str | None:
    """Markdown: this run against the dataset's run before it in `rows` (its history rows of
    the headline metric, oldest first), as `pixelsim diff` shows it; None for a first run."""
    from pixelsim.flows.compare import compare, render
    from pixelsim.flows.show import entries

    runs = entries(rows[-2:])
    if len(runs) < 2 or runs[-1]["run_id"] != run_id:
        return None
    older, newer = runs
    return (f"## Since run {older['run_id'][:8]}\n\nAs `pixelsim diff {older['run_id'][:8]} {newer['run_id'][:8]}` "
            f"shows it:\n\n```\n{render(compare(request.root, older, newer))}\n```\n")


def publish_artifacts(request: Request, result: RunResult) -> None:
    """The run's summary in the Prefect UI: the Markdown report with the templates, the steps
    cached and where the outputs are, a per-class table, the last runs' accuracy, and the report
    folder."""
    report, cached, tmpl = result.report, result.cached, result.outputs.templates
    dataset, prefix = request.dataset, artifact_prefix(request)
    head = report["metrics"][report["metric"]]
    summary = (f"{report['metric']} balanced {head['balanced']} "
               f"({', '.join(f'{c}: {a}' for c, a in head['per_class'].items())})")
    places = output_places(report)
    extra = ["", "## Steps", "", "| step | result |", "|---|---|",
             *[f"| {s} | {'cached' if cached.get(s) else 'computed'} |" for s in STEPS],
             "", "## Outputs", "", *[f"- {what}: {place(uri)}" for what, uri in places.items()], ""]
    create_markdown_artifact(key=artifact_key(prefix, "report"),
                             markdown=render_markdown(report) + "\n".join(template_images(tmpl) + extra),
                             description=f"{summary}: pixel-similarity report for {dataset}")
    rows = [{"class": c, "train": report["counts"]["train"].get(c, 0), "valid": report["counts"]["valid"].get(c, 0),
             **{f"{m} accuracy": report["metrics"][m]["per_class"][c] for m in report["metrics"]}}
            for c in report["classes"]]
    create_table_artifact(key=artifact_key(prefix, "accuracy"), table=rows,
                          description=f"per-class accuracy for {dataset}")
    recent = recent_rows(Root(request.root), dataset, request.options.metric, HISTORY_RUNS + 1)   # read once
    create_table_artifact(key=artifact_key(prefix, "history"), table=history_table(recent),
                          description=f"the last runs of {dataset} ({report['metric']}) in this root, newest first, "
                                      "with the change in balanced accuracy since the run before")
    if changes := changes_since_last_run(request, result.run_id, recent):
        create_markdown_artifact(key=artifact_key(prefix, "changes"), markdown=changes,
                                 description=f"what changed since the run of {dataset} before this one")
    folder = places["report"]
    if folder.startswith(("http://", "https://")):
        create_link_artifact(folder, link_text=folder, key=artifact_key(prefix, "report-folder"),
                             description=f"the report files of this {dataset} run in the storage root")
    else:
        create_markdown_artifact(key=artifact_key(prefix, "report-folder"),
                                 markdown=f"Report folder: `{folder}`\n\nOpen `{folder}/report.html` in a browser.",
                                 description=f"the report files of this {dataset} run in the storage root")
