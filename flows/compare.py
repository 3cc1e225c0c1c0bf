"""Run-to-run comparison, from the stored files alone: what changed between two runs of a
dataset (accuracy per class, the source archive member by member, the parameters).

`pixelsim runs` lists the history, `pixelsim diff A B` compares two runs, and each flow run's
`…-changes` artifact compares it with the run before it. No Prefect is imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pixelsim.flows.show import find_run, runs_of
from pixelsim.storage.errors import IntegrityError, PixelsimError, shown
from pixelsim.storage.history import read_run_record
from pixelsim.storage.root import Root
from pixelsim.tasks.contracts import Tree

SHOWN = 5   # member names shown per kind of change; the counts are always whole


@dataclass(frozen=True)
class SourceChange:
    """How the archive of run B differs from run A's, by member path and sha256."""

    a_sha256: str
    b_sha256: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    note: str = ""          # why members could not be compared, when they could not

    @property
    def same(self) -> bool:
        return self.a_sha256 == self.b_sha256


@dataclass(frozen=True)
class RunDiff:
    a: dict[str, Any]                                  # run_id, time, dataset of each run
    b: dict[str, Any]
    accuracy: dict[str, list[tuple[str, float | None, float | None]]]   # metric -> (row, a, b)
    source: SourceChange
    parameters: dict[str, tuple[Any, Any]] = field(default_factory=dict)   # name -> (a, b), only those that differ

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "parameters": {k: {"a": a, "b": b} for k, (a, b) in self.parameters.items()},
                "source": {"same": self.source.same, "a_sha256": self.source.a_sha256,
                           "b_sha256": self.source.b_sha256, "added": list(self.source.added),
                           "removed": list(self.source.removed), "changed": list(self.source.changed),
                           "note": self.source.note},
                "accuracy": {m: [{"row": r, "a": a, "b": b, "change": change(a, b)} for r, a, b in rows]
                             for m, rows in self.accuracy.items()}}


def change(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 4)


def _members(root: str, record: dict) -> dict[str, str] | None:
    """{path: sha256} of a run's unpacked archive, or None when that folder is gone."""
    from pixelsim.tasks.convert import tree_entries

    rel = (record.get("outputs") or {}).get("tree")
    if not rel:
        return None
    try:
        return {p: e[2] for p, e in tree_entries(Tree.load(root, rel)).items()}
    except (OSError, PixelsimError, ValueError):
        return None


def source_change(root: str, a: dict, b: dict) -> SourceChange:
    sha_a, sha_b = a["source"].get("sha256", ""), b["source"].get("sha256", "")
    if sha_a == sha_b:
        return SourceChange(sha_a, sha_b)
    ma, mb = _members(root, a), _members(root, b)
    if ma is None or mb is None:
        gone = a["run_id"] if ma is None else b["run_id"]
        return SourceChange(sha_a, sha_b, note=f"the unpacked archive of run {gone[:8]} is no longer in the root")
    return SourceChange(sha_a, sha_b, added=tuple(sorted(mb.keys() - ma.keys())),
                        removed=tuple(sorted(ma.keys() - mb.keys())),
                        changed=tuple(sorted(p for p in ma.keys() & mb.keys() if ma[p] != mb[p])))


def parameters(a: dict, b: dict) -> dict[str, tuple[Any, Any]]:
    """What each run was asked and its options, where they differ (credentials never stored)."""
    def flat(record: dict) -> dict[str, Any]:
        req = record.get("request") or {}
        return {"dataset": record.get("dataset"), "source": req.get("source"), "sha256": req.get("sha256"),
                "refresh": req.get("refresh"), **(record.get("options") or {})}
    fa, fb = flat(a), flat(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)}


def accuracy(a: dict, b: dict) -> dict[str, list[tuple[str, float | None, float | None]]]:
    out = {}
    for metric in sorted(a["metrics"].keys() | b["metrics"].keys()):
        ma, mb = a["metrics"].get(metric, {}), b["metrics"].get(metric, {})
        pa, pb = ma.get("per_class", {}), mb.get("per_class", {})
        rows = [(c, pa.get(c), pb.get(c)) for c in [*pa, *(c for c in pb if c not in pa)]]
        out[metric] = rows + [(k, ma.get(k), mb.get(k)) for k in ("balanced", "overall")]
    return out


def diff(root_url: str, a: str | None = None, b: str | None = None) -> RunDiff:
    """Run `b` (default: the latest) against `a` (default: the run of the same dataset before `b`)."""
    if a is not None and b is None:
        a, b = None, a
    newer = find_run(root_url, b)["run"]
    if a is None:
        before = [r for r in runs_of(root_url) if r["dataset"] == newer["dataset"]
                  and (r["time"], r["run_id"]) < (newer["time"], newer["run_id"])]
        if not before:
            raise PixelsimError(f"run {newer['run_id'][:8]} is the first run of {newer['dataset']} in {root_url}: "
                                "nothing to compare it with (give two run ids)")
        older = before[-1]
    else:
        older = find_run(root_url, a)["run"]
    return compare(root_url, older, newer)


def compare(root_url: str, older: dict, newer: dict) -> RunDiff:
    """Two history entries (`pixelsim.flows.show` runs) compared through their run records."""
    root = Root(root_url)
    records = []
    for run in (older, newer):
        try:
            records.append(read_run_record(root, run["dataset"], run["run_id"]))
        except (OSError, ValueError, IntegrityError):   # gone, damaged or foreign: the history row alone
            records.append({"run_id": run["run_id"], "dataset": run["dataset"], "source": {}})
    for run, rec in zip((older, newer), records):
        rec.setdefault("source", {"sha256": run.get("source_sha256", "")})
    head = lambda r: {"run_id": r["run_id"], "time": r["time"].isoformat(), "dataset": r["dataset"]}  # noqa: E731
    return RunDiff(a=head(older), b=head(newer), accuracy=accuracy(older, newer),
                   source=source_change(root_url, records[0], records[1]), parameters=parameters(*records))


def render_source(s: SourceChange) -> list[str]:
    if s.same:
        return [f"source archive: unchanged (sha256 {s.a_sha256[:12]})"]
    lines = [f"source archive: changed, sha256 {s.a_sha256[:12]} -> {s.b_sha256[:12]}"]
    if s.note:
        return lines + [f"  members not compared: {s.note}"]
    for kind, names in (("added", s.added), ("removed", s.removed), ("changed", s.changed)):
        if names:
            more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
            lines.append(f"  {len(names)} member(s) {kind}: {', '.join(names[:SHOWN])}{more}")
    if not (s.added or s.removed or s.changed):
        lines.append("  the same members with the same bytes (only the archive's packing differs)")
    return lines


def render(d: RunDiff) -> str:
    lines = [f"{d.a['dataset']}: run {d.a['run_id'][:8]} ({d.a['time'][:19]}) -> run {d.b['run_id'][:8]} "
             f"({d.b['time'][:19]})"]
    lines += render_source(d.source)
    if d.parameters:
        lines.append("parameters that differ:")
        lines += [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in d.parameters.items()]
    else:
        lines.append("parameters: the same")
    for metric, rows in d.accuracy.items():
        width = max(len(r) for r, _, _ in rows)
        lines.append(f"{metric} accuracy{'':{max(0, width - 8)}}       A        B   change")
        lines += [f"  {r:<{width}}  {_f(a):>7}  {_f(b):>7}  {_signed(change(a, b)):>7}" for r, a, b in rows]
    return "\n".join(shown(line) for line in lines)   # each line ours; names from the data escaped


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}"


def list_runs(root_url: str, dataset: str | None = None, last: int = 20) -> list[dict]:
    """The last runs, newest first, each with its headline accuracy and the change since the
    dataset's run before it."""
    runs = runs_of(root_url)
    out, previous = [], {}
    for r in runs:
        head = next((m for m, v in r["metrics"].items() if v["headline"]), next(iter(r["metrics"])))
        bal = r["metrics"][head]["balanced"]
        prev = previous.get((r["dataset"], head))
        previous[(r["dataset"], head)] = bal
        if dataset is None or r["dataset"] == dataset:
            out.append({"run_id": r["run_id"], "time": r["time"].isoformat(), "dataset": r["dataset"],
                        "metric": head, "balanced": bal, "change": change(prev, bal),
                        "cached_steps": sum(s["cached"] for s in r["steps"]), "steps": len(r["steps"]),
                        "seconds": r["seconds"], "source_sha256": r.get("source_sha256", "")})
    return out[::-1][:last]


def render_runs(rows: list[dict], root_url: str, dataset: str | None = None) -> str:
    if not rows:
        return f"no runs recorded in {root_url}" + (f" for {dataset}" if dataset else "")
    lines = [f"{'time (UTC)':19}  {'run':8}  {'dataset':14} metric  balanced   change  cached  seconds  source"]
    lines += [f"{r['time'][:19].replace('T', ' ')}  {r['run_id'][:8]}  {r['dataset']:14} {r['metric']:6}  "
              f"{r['balanced']:8.4f}  {_signed(r['change']):>7}  {r['cached_steps']}/{r['steps']:<4} "
              f"{r['seconds']:7.1f}  {r['source_sha256'][:12]}" for r in rows]
    return "\n".join(shown(line) for line in lines)   # each line ours; names from the data escaped
