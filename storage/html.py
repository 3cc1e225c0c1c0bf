"""report.html: one self-contained page (inline CSS, images as data: URIs, no script).

`report_pictures` reads what the page shows beyond the report JSON from the root;
`render_report` is a pure function of that plain data, so it is tested without files.
Names from the archive (classes, paths) are untrusted: everything is escaped.
"""
from __future__ import annotations

import base64
import html
import math
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pixelsim.storage.artifacts import MAX_PICTURES, mistakes, read_templates
from pixelsim.storage.images import encode_png
from pixelsim.storage.root import Root
from pixelsim.storage.shards import iter_arrays

WORST = 12
THUMB = 128          # gallery images larger than this are shown subsampled, to keep the page small
BOOK_CROP = ((4, 15), (4, 22))   # fastbook's `im3_t[4:15, 4:22]` of a 28x28 digit
WHOLE_UP_TO = (16, 24)           # smaller templates are shown whole in the heat map
WINDOW = (11, 18)


def heatmap_window(shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The book's crop for 28x28, the whole image when small, else a central window of the same size."""
    h, w = shape
    if (h, w) == (28, 28):
        return BOOK_CROP
    if h <= WHOLE_UP_TO[0] and w <= WHOLE_UP_TO[1]:
        return (0, h), (0, w)
    r0, c0 = max(0, (h - WINDOW[0]) // 2), max(0, (w - WINDOW[1]) // 2)
    return (r0, min(h, r0 + WINDOW[0])), (c0, min(w, c0 + WINDOW[1]))


def _pixels(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """As `write_templates` makes the template PNGs: float32 in [0, 1] to uint8."""
    return np.rint(np.asarray(flat, np.float32).reshape(shape) * 255).clip(0, 255).astype(np.uint8)


def _png(image: np.ndarray | None) -> dict:
    if image is None:
        return {"png": None, "size": None}
    return {"png": encode_png(image), "size": list(image.shape[:2])}


def _thumb(image: np.ndarray) -> np.ndarray:
    step = math.ceil(max(image.shape[:2]) / THUMB)
    return np.ascontiguousarray(image[::step, ::step]) if step > 1 else image


def worst_predictions(root: Root, files: list[str], k: int = WORST) -> dict[str, list[dict]]:
    """Per metric, the k most confidently wrong predictions: smallest distance to the wrong template.

    Ties go by path, so the page is the same on every run.
    """
    parts = []
    for rel in files:
        with root.open(rel) as f:
            table = pq.ParquetFile(f).read(columns=["path", "label", "metric", "predicted", "correct", "distance"])
        wrong = table.filter(pc.invert(table.column("correct")))
        parts.append(wrong.append_column("predictions", pa.array([rel] * len(wrong), pa.string())))
    if not parts:
        return {}
    wrong = pa.concat_tables(parts)
    out = {}
    for metric in sorted(set(wrong.column("metric").to_pylist())):
        rows = wrong.filter(pc.equal(wrong.column("metric"), metric))
        out[metric] = rows.sort_by([("distance", "ascending"), ("path", "ascending")]).slice(0, k).to_pylist()
    return out


def report_pictures(root: Root, templates_file: str, evaluation_dir: str, valid_shards: list[str],
                    k: int = WORST) -> dict:
    """Template images and pixel values, and the worst predictions with their pixels from the shards."""
    classes, means, shape = read_templates(root, templates_file)
    images = [_pixels(m, shape) for m in means]
    gray = [im if im.ndim == 2 else np.rint(im.mean(axis=2)).astype(np.uint8) for im in images]
    (r0, r1), (c0, c1) = heatmap_window(gray[0].shape)
    pictures = {
        "shape": list(shape),
        "templates": [{"class": c, **_png(im)} for c, im in zip(classes[:MAX_PICTURES], images)],
        "template_count": len(classes),
        "heatmap": {"class": classes[0], "rows": [r0, r1], "cols": [c0, c1],
                    "values": gray[0][r0:r1, c0:c1].tolist()},
    }
    manifest = root.manifest(evaluation_dir)
    files = sorted(posixpath.join(evaluation_dir, f["name"]) for f in manifest["files"]
                   if f["name"].startswith("predictions-") and f["name"].endswith(".parquet"))
    worst = worst_predictions(root, files, k)
    # predictions-<shard>.parquet holds the predictions of validation shard <shard>.parquet
    by_name = {posixpath.basename(s): s for s in valid_shards}
    wanted: dict[str, set[str]] = {}
    for rows in worst.values():
        for row in rows:
            shard = by_name.get(posixpath.basename(row["predictions"]).removeprefix("predictions-"))
            for s in [shard] if shard else valid_shards:
                wanted.setdefault(s, set()).add(row["path"])
    found: dict[str, np.ndarray] = {}
    for shard in valid_shards:
        if shard not in wanted:
            continue
        (batch,) = iter_arrays(root, [shard], ("path", "image"))
        for i, path in enumerate(batch["path"]):
            if path in wanted[shard] and path not in found:
                found[path] = _thumb(batch["image"][i].reshape(shape))
    pictures["worst"] = {m: [{"path": r["path"], "label": r["label"], "predicted": r["predicted"],
                              "distance": float(r["distance"]), **_png(found.get(r["path"]))} for r in rows]
                         for m, rows in worst.items()}
    return pictures


# -- rendering -------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:24px auto;
max-width:1120px;padding:0 16px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#666}.mono{font-family:ui-monospace,Menlo,Consolas,monospace}
table{border-collapse:collapse;margin:6px 0}th,td{padding:3px 8px;border:1px solid #e2e2e2;text-align:right}
th{background:#f6f6f6;font-weight:600}td.l,th.l{text-align:left}
.headline{background:#fff6d5}.big{font-size:20px;font-weight:600}
.pix{image-rendering:pixelated;image-rendering:crisp-edges;border:1px solid #ccc;background:#000}
.templates,.gallery{display:flex;flex-wrap:wrap;gap:14px}
.templates figure,.gallery figure{margin:0;text-align:center}
.gallery figure{width:150px;font-size:12px}.gallery .path{word-break:break-all;color:#555;font-size:11px}
.bar{display:inline-block;width:90px;height:9px;background:#eee;margin-right:6px;vertical-align:middle}
.bar span{display:block;height:100%;background:#3b7dd8}
.heat td{width:26px;height:20px;padding:0;text-align:center;font-size:9pt;border:none}
.heat th{font-size:8pt;padding:0 3px;font-weight:400;color:#777;background:none;border:none}
.conf-wrap{overflow-x:auto}.conf td,.conf th{font-size:12px;padding:2px 6px;min-width:30px}
.conf td.diag{outline:2px solid #3b7dd8;outline-offset:-2px}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _img(png: bytes | None, size: list[int], target: int, alt: str, cls: str) -> str:
    """Small images are scaled up by a whole factor (crisp pixels), large ones shown at `target`."""
    if png is None:
        return '<div class="muted">(pixels not found)</div>'
    h, w = size[0], size[1]
    scale = target / max(h, w)
    scale = math.floor(scale) if scale >= 1 else scale
    data = base64.b64encode(png).decode()
    return (f'<img class="pix {cls}" alt="{_e(alt)}" width="{round(w * scale)}" height="{round(h * scale)}" '
            f'src="data:image/png;base64,{data}">')


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def _bar(x: float | None) -> str:
    pct = 0.0 if x is None else max(0.0, min(100.0, 100 * x))
    return f'<span class="bar"><span style="width:{pct:.1f}%"></span></span>{_fmt(x)}'


def _heatmap(heat: dict) -> str:
    (r0, _), (c0, c1) = heat["rows"], heat["cols"]
    head = "".join(f"<th>{c}</th>" for c in range(c0, c1))
    rows = []
    for i, row in enumerate(heat["values"]):
        cells = []
        for v in row:
            g = 255 - int(v)   # "Greys": 0 white, 255 black
            fg = "#fff" if v > 120 else "#222"
            cells.append(f'<td style="background:rgb({g},{g},{g});color:{fg}">{int(v)}</td>')
        rows.append(f"<tr><th>{r0 + i}</th>{''.join(cells)}</tr>")
    return f'<table class="heat"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def _confusion(classes: list[str], matrix: list[list[int]]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in classes)
    rows = []
    for i, (c, row) in enumerate(zip(classes, matrix)):
        total = sum(row) or 1
        cells = []
        for j, n in enumerate(row):
            a = n / total
            colour = f"rgba(59,125,216,{a:.3f})" if i == j else f"rgba(214,69,65,{min(1.0, 2 * a):.3f})"
            fg = "#fff" if (i == j and a > 0.6) or (i != j and a > 0.3) else "#222"
            cells.append(f'<td class="{"diag" if i == j else "off"}" style="background:{colour};color:{fg}">{n}</td>')
        rows.append(f'<tr><th class="l">{_e(c)}</th>{"".join(cells)}<td class="muted">{sum(row)}</td></tr>')
    return (f'<div class="conf-wrap"><table class="conf"><tr><th class="l">true \\ predicted</th>{head}'
            f'<th class="muted">images</th></tr>{"".join(rows)}</table></div>')


def _mistakes(pairs: list[tuple[str, str, int]]) -> str:
    rows = "".join(f'<tr><td class="l">{_e(t)}</td><td class="l">{_e(p)}</td><td>{n}</td></tr>' for t, p, n in pairs)
    return f'<table><tr><th class="l">true</th><th class="l">predicted</th><th>images</th></tr>{rows}</table>'


def _gallery(rows: list[dict], metric: str) -> str:
    if not rows:
        return '<p class="muted">No misclassified validation images.</p>'
    cards = []
    for r in rows:
        cards.append(f'<figure>{_img(r["png"], r["size"], 84, r["path"], "worst")}<figcaption>'
                     f'true <b>{_e(r["label"])}</b> → predicted <b>{_e(r["predicted"])}</b><br>'
                     f'distance {r["distance"]:.4f}<div class="path mono">{_e(r["path"])}</div>'
                     f'</figcaption></figure>')
    return f'<div class="gallery" data-metric="{_e(metric)}">{"".join(cards)}</div>'


def render_report(report: dict, pictures: dict) -> str:
    """The whole page as a string; `pictures` is what `report_pictures` returns."""
    classes, counts, metrics = report["classes"], report["counts"], report["metrics"]
    names, headline = list(metrics), report["metric"]
    shape = pictures["shape"]
    src = report["source"]
    ntrain, nvalid = sum(counts["train"].values()), sum(counts["valid"].values())
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>Pixel similarity: {_e(report['dataset'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Pixel similarity: {_e(report['dataset'])}</h1>",
           f'<p class="muted">Each validation image is classified as the class whose mean training image '
           f'(template) is nearest. {len(classes)} classes, {ntrain} train / {nvalid} valid images of '
           f'{"x".join(map(str, shape))} pixels.<br>Source <span class="mono">{_e(src.get("url", ""))}</span>'
           f' (sha256 <span class="mono">{_e(str(src.get("sha256", ""))[:16])}…</span>)'
           + (f" — {_e(src['note'])}" if src.get("note") else "") + "</p>"]

    out += ["<h2>Accuracy</h2>", '<table><tr><th class="l">metric</th><th>balanced (mean of classes)</th>'
            "<th>overall</th></tr>"]
    for n in names:
        m = metrics[n]
        cls = ' class="headline"' if n == headline else ""
        out.append(f'<tr{cls}><td class="l">{_e(n)}{" (headline)" if n == headline else ""}</td>'
                   f'<td class="big">{_fmt(m["balanced"])}</td><td>{_fmt(m["overall"])}</td></tr>')
    out.append("</table>")

    out += ["<h2>Templates</h2>", '<p class="muted">The mean of every training image of a class.</p>',
            '<div class="templates">']
    for t in pictures["templates"]:
        c = t["class"]
        out.append(f'<figure>{_img(t["png"], t["size"], 112, f"template of class {c}", "template")}'
                   f'<figcaption><b>{_e(c)}</b> <span class="muted">({counts["train"].get(c, 0)} images)'
                   f"</span></figcaption></figure>")
    out.append("</div>")
    if pictures.get("template_count", 0) > len(pictures["templates"]):
        out.append(f'<p class="muted">The first {len(pictures["templates"])} of {pictures["template_count"]} classes; every '
                   f'template is a PNG in <span class="mono">{_e(report["artifacts"]["templates"])}</span>.</p>')
    heat = pictures["heatmap"]
    (r0, r1), (c0, c1) = heat["rows"], heat["cols"]
    out += [f"<h3>Pixel values of the template of class {_e(heat['class'])} "
            f'<span class="muted">(rows {r0}–{r1 - 1}, columns {c0}–{c1 - 1}, 0–255; darker is higher, '
            f"as in fastbook)</span></h3>", _heatmap(heat)]

    out += ["<h2>Per class</h2>", '<table><tr><th class="l">class</th><th>train images</th><th>valid images</th>'
            + "".join(f"<th class=\"l\">{_e(n)} accuracy</th>" for n in names) + "</tr>"]
    for c in classes:
        out.append(f'<tr><td class="l">{_e(c)}</td><td>{counts["train"].get(c, 0)}</td>'
                   f'<td>{counts["valid"].get(c, 0)}</td>'
                   + "".join(f'<td class="l">{_bar(metrics[n]["per_class"][c])}</td>' for n in names) + "</tr>")
    out.append("</table>")

    for n in names:
        worst = pictures["worst"].get(n, [])
        out += [f"<h2>{_e(n)}{' (headline)' if n == headline else ''}</h2>",
                *(['<h3>Confusion <span class="muted">(rows true, columns predicted)</span></h3>',
                   _confusion(classes, metrics[n]["confusion"])] if "confusion" in metrics[n] else
                  [f'<h3>The most frequent mistakes <span class="muted">({len(classes)} classes: the whole matrix '
                   f'is in confusion-{_e(n)}.csv)</span></h3>', _mistakes(mistakes(metrics[n]))]),
                f'<h3>The {len(worst)} most confidently wrong <span class="muted">(smallest {_e(n)} distance '
                f"to the wrong template)</span></h3>", _gallery(worst, n)]

    if report.get("notes"):
        out += ["<h2>Notes</h2><ul>", *[f"<li>{_e(x)}</li>" for x in report["notes"]], "</ul>"]
    if report.get("skipped"):
        out += [f"<h2>Skipped bad files ({len(report['skipped'])})</h2><ul>",
                *[f'<li class="mono">{_e(x)}</li>' for x in report["skipped"]], "</ul>"]
    out += ["<h2>Artifacts</h2><ul>",
            *[f'<li>{_e(k)}: <span class="mono">{_e(v)}</span></li>' for k, v in report["artifacts"].items()],
            "</ul>", "</body></html>"]
    return "\n".join(out)

