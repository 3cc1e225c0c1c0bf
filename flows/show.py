"""`pixelsim show`: a past run's summary from the stored files alone.

Reads the run history and the report folder; never imports Prefect, so it answers at
once and needs no server.
"""
from __future__ import annotations

import json
import os
import posixpath

from pixelsim.storage.errors import IntegrityError, NotPublished, PixelsimError, shown
from pixelsim.storage.history import HISTORY, as_rows, read_history
from pixelsim.storage.root import Root
from pixelsim.tasks.contracts import Report


def runs_of(root_url: str) -> list[dict]:
    """One entry per run, oldest first: the run's fields and its rows by metric."""
    return entries(as_rows(read_history(Root(root_url))))


def entries(rows: list[dict]) -> list[dict]:
    """History rows (one per run and metric) grouped into one entry per run, oldest first."""
    runs: dict[str, dict] = {}
    for row in rows:
        run = runs.setdefault(row["run_id"], {"run_id": row["run_id"], "time": row["time"], "dataset": row["dataset"],
                                              "seconds": row["total_seconds"], "steps": row["steps"],
                                              "report_dir": row["report"], "source_sha256": row["source_sha256"],
                                              "report_rel": (row.get("outputs") or {}).get("report"), "metrics": {}})
        run["metrics"][row["metric"]] = {"per_class": {p["class"]: p["accuracy"] for p in row["per_class"]},
                                         "balanced": row["balanced"], "overall": row["overall"],
                                         "headline": row["headline"]}
    return sorted(runs.values(), key=lambda r: (r["time"], r["run_id"]))


def _report_dir(path: str) -> str | None:
    """The report folder named by `path` (the folder, or its report.json/.html/.md), if it holds a report."""
    path = path.rstrip("/")
    for folder in (path, posixpath.dirname(path)):
        try:
            if Root(folder).exists("report.json"):
                return folder
        except (OSError, ValueError):
            continue
    return None


def _load_report(folder: str) -> dict | None:
    """The report in `folder`, its root-relative artifacts as URIs of the root it lies in."""
    try:
        Root(folder).verify("")
        report = Root(folder).read_json(Report.FILE)
    except NotPublished:
        return None
    except IntegrityError as e:
        raise PixelsimError(f"{e}; `pixelsim run` with the same options rebuilds it") from None
    rel, uri = str(report.get("artifacts", {}).get("report", "")), Root(folder).uri("").rstrip("/")
    if rel and not rel.startswith("/") and "://" not in rel and uri.endswith("/" + rel):
        return Report.located(uri[:-len(rel) - 1], report)
    return report   # written before artifacts were root-relative


def find_run(root_url: str, run: str | None) -> dict:
    """Latest run, a run id (or unique prefix), or a report folder; returns {"run": ..., "report": ...}."""
    root = Root(root_url)
    runs = runs_of(root_url)
    if run and ("://" in run or os.path.exists(run)):
        folder = _report_dir(run)
        if folder is None:
            raise PixelsimError(f"{run}: not a report folder (no report.json there)")
        report = _load_report(folder)
        uri = Root(folder).uri("")
        here = {uri.rstrip("/"), folder.rstrip("/")}
        # the history keeps report folders root-relative (older rows: as the run wrote them)
        same = [r for r in runs if r["report_dir"].rstrip("/") in here
                or root.uri(r.get("report_rel") or r["report_dir"]).rstrip("/") in here]
        if report is None and not same:
            raise PixelsimError(f"{run}: a report folder without its manifest (never published, or its run did not "
                                "finish), and no run in the history names it; `pixelsim run` with the same options "
                                "rebuilds it")
        return {"run": same[-1] if same else None, "report": report, "report_dir": uri}
    if not runs:
        raise PixelsimError(f"no runs recorded under {root.uri(HISTORY)}: run `pixelsim run` first, "
                            "or pass a report folder")
    if run is None:
        chosen = runs[-1]
    else:
        matches = [r for r in runs if r["run_id"].startswith(run)]
        if not matches:
            raise PixelsimError(f"no run {run!r} in {root.uri(HISTORY)} ({len(runs)} runs recorded)")
        if len(matches) > 1:
            raise PixelsimError(f"run id prefix {run!r} is ambiguous: " + ", ".join(r["run_id"] for r in matches))
        chosen = matches[0]
    # the run's report folder in this root (it may be mounted elsewhere than where the run wrote it)
    where = root.uri(chosen["report_rel"]) if chosen.get("report_rel") else chosen["report_dir"]
    return {"run": chosen, "report": _load_report(where), "report_dir": where}


def as_json(found: dict) -> dict:
    run = found["run"]
    return {"run_id": run and run["run_id"], "time": run and run["time"].isoformat(),
            "seconds": run and run["seconds"], "steps": run and run["steps"],
            "metrics": run and run["metrics"], "report_dir": found["report_dir"], "report": found["report"]}


def render(found: dict) -> str:
    run, rep = found["run"], found["report"]
    lines = []
    if rep:
        counts = rep["counts"]
        lines.append(f"{rep['dataset']}: {len(rep['classes'])} classes, {sum(counts['train'].values())} train / "
                     f"{sum(counts['valid'].values())} valid images")
    if run:
        lines.append(f"run {run['run_id']}  {run['time']:%Y-%m-%d %H:%M:%S} UTC  {run['seconds']:.1f} s")
        if not rep:
            lines.append(f"{run['dataset']}: report folder {found['report_dir']} is gone; figures from the history")
    if rep:
        src = rep["source"]
        lines.append(f"source: {src['url']} (sha256 {src['sha256'][:16]}…)"
                     + (f" ({src['note']})" if src.get("note") else ""))
        metrics, classes, headline = rep["metrics"], rep["classes"], rep["metric"]
    else:
        metrics, classes = run["metrics"], list(next(iter(run["metrics"].values()))["per_class"])
        headline = next((m for m, v in metrics.items() if v["headline"]), None)
    names = list(metrics)
    width = max([len("balanced"), *(len(shown(c)) for c in classes)])
    lines.append(f"  {'accuracy':<{width}}  " + "  ".join(f"{n + ('*' if n == headline else ''):>7}" for n in names))
    for c in classes:
        lines.append(f"  {shown(c):<{width}}  " + "  ".join(f"{_f(metrics[n]['per_class'].get(c)):>7}" for n in names))
    for k in ("balanced", "overall"):
        lines.append(f"  {k:<{width}}  " + "  ".join(f"{_f(metrics[n][k]):>7}" for n in names))
    if headline:
        lines.append("  (* headline metric)")
    if run:
        cached = sum(s["cached"] for s in run["steps"])
        lines.append(f"steps ({cached} of {len(run['steps'])} cached):")
        lines += [f"  {s['step']:<10} {s['seconds']:7.2f} s  {'cached' if s['cached'] else 'computed'}"
                  for s in run["steps"]]
    lines.append(f"report: {posixpath.join(found['report_dir'], 'report.html')}")
    return "\n".join(shown(line) for line in lines)   # each line ours; names from the data escaped


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def show(run: str | None, root: str, as_json_output: bool = False) -> str:
    found = find_run(root, run)
    return json.dumps(as_json(found), indent=2) if as_json_output else render(found)
