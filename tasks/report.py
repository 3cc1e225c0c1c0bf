"""Step 6: the accuracy report, as JSON for machines, Markdown and a self-contained HTML page for people."""
from __future__ import annotations

from storage.artifacts import TEMPLATES, confusion_csv
from storage.html import render_report, report_pictures
from storage.root import Root, digest_json
from tasks.caching import step

VERSION = "3"
PLACES = 4


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, PLACES)


def build_report(dataset: str, source: dict, shards: dict, templates: dict, evaluation: dict,
                 metric: str, notes: list[str], report_dir: str) -> dict:
    """The report JSON: figures rounded to 4 places, confusion rows are true classes."""
    classes = evaluation["classes"]
    root = Root(shards["root"])
    metrics = {}
    for name, m in evaluation["metrics"].items():
        metrics[name] = {"per_class": {c: _r(a) for c, a in zip(classes, m["per_class"])},
                         "balanced": _r(m["balanced"]), "overall": _r(m["overall"]),
                         "confusion": m["confusion"]}
    return {
        "dataset": dataset,
        "source": source,
        "classes": classes,
        "counts": shards["counts"],
        "shape": shards["shape"],
        "metric": metric,
        "metrics": metrics,
        "notes": notes,
        "skipped": shards.get("skipped", []),
        "artifacts": {
            "shards": root.uri(shards["dir"]),
            "templates": root.uri(templates["dir"]),
            "predictions": root.uri(evaluation["predictions"]),
            "report": root.uri(report_dir),
        },
    }


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
                  [[c, counts["train"].get(c, 0), counts["valid"].get(c, 0),
                    *[metrics[n]["per_class"][c] for n in names]] for c in classes])]
    for n in names:
        out += ["", f"## Confusion ({n}; rows true, columns predicted)", "",
                _table(["true \\ predicted", *classes], [[c, *row] for c, row in zip(classes, metrics[n]["confusion"])])]
    if report["notes"]:
        out += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    if report.get("skipped"):
        out += ["", f"## Skipped bad files ({len(report['skipped'])})", "", *[f"- {n}" for n in report["skipped"]]]
    out += ["", "## Artifacts", "", *[f"- {k}: `{v}`" for k, v in report["artifacts"].items()], ""]
    return "\n".join(out)


def write_report(dataset: str, source: dict, shards: dict, templates: dict, evaluation: dict,
                 metric: str, notes: list[str], root: str) -> dict:
    """Publish reports/<dataset>/<key>/ with report.json, report.md, report.html and confusion-<metric>.csv."""
    r = Root(root)
    rel = f"reports/{dataset}/{digest_json([source, evaluation['digest'], metric, notes, VERSION])[:16]}"
    report = build_report(dataset, source, shards, templates, evaluation, metric, notes, rel)
    pictures = report_pictures(r, f"{templates['dir']}/{TEMPLATES}", evaluation["dir"], shards["shards"]["valid"])
    with r.publish_dir(rel) as st:
        st.write_json("report.json", report)
        st.write_bytes("report.md", render_markdown(report).encode())
        st.write_bytes("report.html", render_report(report, pictures).encode())
        for name, m in report["metrics"].items():
            st.write_bytes(f"confusion-{name}.csv", confusion_csv(report["classes"], m["confusion"]))
    return {"root": root, "dir": rel, "digest": st.digest, "report": report}


report = step("report", VERSION)(write_report)
