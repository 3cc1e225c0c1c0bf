"""Step 6: the accuracy report, as JSON for machines, Markdown and a self-contained HTML page for people."""
from __future__ import annotations

import dataclasses
import re

from pixelsim.storage import catalog
from pixelsim.storage.artifacts import TEMPLATES, confusion_csv, confusion_entry, mistakes, stored_confusion
from pixelsim.storage.cache import Outcome, reuse_or_build
from pixelsim.storage.html import render_report, report_pictures
from pixelsim.storage.root import Root
from pixelsim.tasks.contracts import Evaluation, Report, ShardSet, Templates

VERSION = "6"   # 6: artifacts root-relative in report.json; 5: confusion as pairs beyond MAX_MATRIX classes
PLACES = 4


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, PLACES)


def build_report(source: dict, shards: ShardSet, templates: Templates, evaluation: Evaluation,
                 metric: str, notes: list[str], report_dir: str) -> dict:
    """The report JSON: figures rounded to 4 places, confusion rows are true classes. Its artifacts
    are root-relative, so a cached report is right wherever the root is mounted; `Report.load`
    gives them as URIs of the root it was loaded from."""
    classes = evaluation.classes
    metrics = {}
    for name, m in evaluation.metrics.items():
        metrics[name] = {"per_class": {c: _r(a) for c, a in zip(classes, m["per_class"])},
                         "balanced": _r(m["balanced"]), "overall": _r(m["overall"]),
                         **confusion_entry(classes, stored_confusion(m, len(classes)))}
    return {
        "dataset": shards.dataset,
        "source": source,
        "classes": classes,
        "counts": shards.counts,
        "shape": shards.shape,
        "metric": metric,
        "metrics": metrics,
        "notes": notes,
        "skipped": shards.skipped,
        "artifacts": {"shards": shards.dir, "templates": templates.dir, "predictions": evaluation.predictions,
                      "report": report_dir},
    }


_MARKDOWN = re.compile(r"([\\`*\[\]<>|~])")   # not _: CommonMark never emphasises inside a word (mnist_tiny)


def md(text: object) -> str:
    """Text from the data (class folder names, paths, notes) as literal Markdown: a class named
    `a|b` or `<img ...>` must not split a table or inject markup into report.md or the UI."""
    return _MARKDOWN.sub(r"\\\1", str(text)).replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    classes, counts, metrics = report["classes"], report["counts"], report["metrics"]
    names = list(metrics)
    src = report["source"]
    out = [f"# Pixel similarity: {report['dataset']}", "",
           f"Source: `{src['url']}` (sha256 `{src['sha256'][:16]}…`)" + (f" — {src['note']}" if src.get("note") else ""),
           "", "## Accuracy", "",
           _table(["metric", "balanced (mean of classes)", "overall"],
                  [[("**%s**" % n) if n == report["metric"] else n, metrics[n]["balanced"], metrics[n]["overall"]]
                   for n in names]),
           "", "## Per class", "",
           _table(["class", "train images", "valid images", *[f"{n} accuracy" for n in names]],
                  [[md(c), counts["train"].get(c, 0), counts["valid"].get(c, 0),
                    *[metrics[n]["per_class"][c] for n in names]] for c in classes])]
    for n in names:
        if "confusion" in metrics[n]:
            out += ["", f"## Confusion ({n}; rows true, columns predicted)", "",
                    _table(["true \\ predicted", *map(md, classes)],
                           [[md(c), *row] for c, row in zip(classes, metrics[n]["confusion"])])]
        else:
            out += ["", f"## Most frequent mistakes ({n})", "",
                    f"{len(classes)} classes: the whole matrix is in `confusion-{n}.csv`.", "",
                    _table(["true", "predicted", "images"],
                           [[md(t), md(p), k] for t, p, k in mistakes(metrics[n])])]
    if report["notes"]:
        out += ["", "## Notes", "", *[f"- {md(n)}" for n in report["notes"]]]
    if report.get("skipped"):
        out += ["", f"## Skipped bad files ({len(report['skipped'])})", "", *[f"- {md(n)}" for n in report["skipped"]]]
    out += ["", "## Artifacts", "", *[f"- {k}: `{v}`" for k, v in report["artifacts"].items()], ""]
    return "\n".join(out)


def write_report(source: dict, shards: ShardSet, templates: Templates, evaluation: Evaluation,
                 metric: str, notes: list[str], refresh: bool = False) -> Outcome[Report]:
    """Publish reports/<dataset>/<key>/ with report.json, report.md, report.html and confusion-<metric>.csv."""
    r = Root(shards.root)
    rel = catalog.report_dir(shards.dataset, catalog.step_key("report", VERSION, source, evaluation.digest,
                                                              metric, notes))

    def build() -> Report:
        report = build_report(source, shards, templates, evaluation, metric, notes, rel)
        pictures = report_pictures(r, f"{templates.dir}/{TEMPLATES}", evaluation.dir, shards.shards["valid"])
        out = Report(root=shards.root, dir=rel, digest="", report=Report.located(shards.root, report))
        with r.publish_dir(rel) as st:
            st.write_json(Report.FILE, report)
            st.write_bytes("report.md", render_markdown(report).encode())
            st.write_bytes("report.html", render_report(report, pictures).encode())
            for name, m in evaluation.metrics.items():
                st.write_bytes(f"confusion-{name}.csv",
                               confusion_csv(report["classes"], stored_confusion(m, len(report["classes"]))))
            st.meta["record"] = out.record()
        return dataclasses.replace(out, digest=st.digest)

    return reuse_or_build(r, rel, lambda: Report.load(shards.root, rel), build, refresh=refresh)
