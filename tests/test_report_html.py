"""report.html: real figures and pictures from the tiny archive, self-contained, and it renders."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TINY_FIGURES, plain_pipeline
from pixelsim.storage.artifacts import TEMPLATES, read_templates
from pixelsim.storage.html import heatmap_window, render_report
from pixelsim.storage.root import Root
from pixelsim.storage.shards import iter_arrays


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The plain functions on the tiny archive; 300-image shards, so the valid split has 3 shards."""
    root = str(tmp_path_factory.mktemp("root"))
    out = plain_pipeline(root)
    page = Path(out.report["artifacts"]["report"]) / "report.html"
    return {"root": root, **vars(out.outputs), "page": page, "html": page.read_text()}


class Page(HTMLParser):
    """Images by role, gallery captions by metric, and the text of every table cell by table class."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict] = []
        self.gallery: dict[str, list[dict]] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self._metric: str | None = None
        self._depth = 0
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._caption: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "gallery" in a.get("class", "").split():
            self._metric, self._depth = a["data-metric"], 0
            self.gallery[self._metric] = []
        if tag == "div" and self._metric:
            self._depth += 1
        if tag == "img":
            self.images.append(a)
            if self._metric:
                self.gallery[self._metric].append({"img": a})
        if tag == "figcaption" and self._metric:
            self._caption = []
        if tag == "table":
            self._table = a.get("class", "plain")
            self.tables.setdefault(self._table, [])
        if tag == "tr" and self._table:
            self.tables[self._table].append([])
        if tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "div" and self._metric:
            self._depth -= 1
            if self._depth == 0:
                self._metric = None
        if tag == "figcaption" and self._caption is not None:
            self.gallery[self._metric][-1]["caption"] = " ".join("".join(self._caption).split())
            self._caption = None
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._caption is not None:
            self._caption.append(data)


def _decode(img: dict) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert img["src"].startswith(prefix)
    return np.array(Image.open(io.BytesIO(base64.b64decode(img["src"][len(prefix):]))))


def test_report_html_is_published_with_the_report(tiny):
    tiny["report"].verify()   # listed in the folder's manifest, unchanged
    names = sorted(p.name for p in tiny["page"].parent.iterdir())
    assert names == ["_manifest.json", "confusion-l1.csv", "confusion-rmse.csv", "report.html", "report.json",
                     "report.md"]


def test_report_html_holds_the_real_figures_and_pictures(tiny):
    text, page = tiny["html"], Page(tiny["html"])
    for metric, want in TINY_FIGURES.items():
        for value in want.values():
            assert f"{value:.4f}" in text, (metric, value)
    # self-contained: every image inline, no script, no stylesheet or font fetched, no link out
    assert "http" not in text and "<script" not in text and "<link" not in text and "url(" not in text
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert not re.search(r'\b(?:src|href)\s*=\s*"(?!data:)', text)

    # the templates, pixel for pixel, scaled up by a whole factor
    root = Root(tiny["root"])
    classes, means, shape = read_templates(root, f"{tiny['templates'].dir}/{TEMPLATES}")
    templates = [i for i in page.images if "template" in i["class"].split()]
    assert len(templates) == 2
    for img, mean in zip(templates, means):
        assert np.array_equal(_decode(img), np.rint(mean.reshape(shape) * 255).clip(0, 255).astype(np.uint8))
        assert int(img["width"]) == 112 and "pix" in img["class"]

    # fastbook's heat map of the first template's central pixels
    heat = page.tables["heat"]
    (r0, r1), (c0, c1) = heatmap_window(shape)
    assert (r0, r1, c0, c1) == (4, 15, 4, 22)
    assert heat[0][1:] == [str(c) for c in range(4, 22)]
    want = np.rint(means[0].reshape(shape)[4:15, 4:22] * 255).astype(int)
    assert [[int(v) for v in row[1:]] for row in heat[1:]] == want.tolist()
    assert [row[0] for row in heat[1:]] == [str(r) for r in range(4, 15)]

    # confusion matrices, rows true, then the row total
    conf = page.tables["conf"]
    rep = tiny["report"].report
    for i, metric in enumerate(["l1", "rmse"]):
        rows = conf[i * 3:(i + 1) * 3]
        assert rows[0][1:3] == ["3", "7"]
        assert [[int(v) for v in r[1:3]] for r in rows[1:]] == rep["metrics"][metric]["confusion"]
        assert [r[3] for r in rows[1:]] == ["350", "350"]

    # per metric, the 12 most confidently wrong, in order, with their own pixels
    preds = pq.read_table(Path(tiny["root"]) / tiny["evaluation"].dir).to_pandas()
    pixels, shard_of = {}, {}
    for i, batch in enumerate(iter_arrays(root, tiny["shards"].shards["valid"], ("path", "image"))):
        pixels.update(zip(batch["path"], batch["image"]))
        shard_of.update(dict.fromkeys(batch["path"], i))
    assert set(page.gallery) == {"l1", "rmse"}
    for metric, cards in page.gallery.items():
        wrong = preds[(preds.metric == metric) & ~preds.correct].sort_values(["distance", "path"]).head(12)
        assert len(cards) == 12
        assert [c["img"]["alt"] for c in cards] == wrong.path.tolist()
        for card, row in zip(cards, wrong.itertuples()):
            assert np.array_equal(_decode(card["img"]), pixels[row.path].reshape(28, 28))
            assert f"true {row.label} → predicted {row.predicted}" in card["caption"]
            assert f"distance {row.distance:.4f}" in card["caption"] and row.path in card["caption"]
    # the worst mistakes come from several of the 3 validation shards
    assert len({shard_of[c["img"]["alt"]] for cards in page.gallery.values() for c in cards}) >= 2


def test_render_many_classes_escapes_names_and_handles_no_mistakes():
    """A pure function: 12 classes (one with markup in its name), a perfect metric, a large image."""
    classes = [str(i) for i in range(11)] + ['<script>"x"</script>']
    n = len(classes)
    confusion = np.diag([10] * n)
    confusion[0, 1] = 3
    rep = {"dataset": "many", "source": {"url": "s3://bucket/a.tgz", "sha256": "ab" * 32}, "classes": classes,
           "counts": {"train": {c: 20 for c in classes}, "valid": {c: 10 for c in classes}}, "shape": [64, 48],
           "metric": "rmse", "notes": ["a <note>"], "artifacts": {"report": "/r"},
           "metrics": {"l1": {"per_class": {c: 1.0 for c in classes}, "balanced": 1.0, "overall": 1.0,
                              "confusion": np.diag([10] * n).tolist()},
                       "rmse": {"per_class": {**{c: 1.0 for c in classes}, "0": None}, "balanced": 0.98,
                                "overall": 0.97, "confusion": confusion.tolist()}}}
    png = io.BytesIO()
    Image.new("L", (48, 64), 128).save(png, "PNG")
    pictures = {"shape": [64, 48], "templates": [{"class": c, "png": png.getvalue(), "size": [64, 48]}
                                                 for c in classes],
                "heatmap": {"class": "0", "rows": [26, 37], "cols": [15, 33], "values": [[0] * 18] * 11},
                "worst": {"rmse": [{"path": "v/0/<i>.png", "label": "0", "predicted": "1", "distance": 0.5,
                                    "png": png.getvalue(), "size": [64, 48]}]}}
    text = render_report(rep, pictures)
    page = Page(text)
    assert "<script" not in text and "&lt;script&gt;&quot;x&quot;&lt;/script&gt;" in text
    assert "a &lt;note&gt;" in text
    assert "v/0/&lt;i&gt;.png" in text
    assert len(page.tables["conf"]) == 2 * (n + 1) and all(len(r) == n + 2 for r in page.tables["conf"])
    assert "No misclassified validation images." in text
    assert len(page.gallery["rmse"]) == 1 and "l1" not in page.gallery
    # 64x48 is not scaled up by a whole factor to 112 (templates) or 84 (gallery) on its long side
    assert {(img["width"], img["height"]) for img in page.images} == {("48", "64")}
    assert len(page.images) == n + 1
    assert heatmap_window((64, 48)) == ((26, 37), (15, 33)) and heatmap_window((8, 8)) == ((0, 8), (0, 8))


def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"),
                    reason="chromium is not installed (CI installs it and always runs this test)")
def test_report_html_renders_in_chromium(tiny, tmp_path):
    exe = _chromium()
    assert exe, "chromium must be installed in CI"
    shot = tmp_path / "report.png"
    p = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                        "--window-size=1200,2000", tiny["page"].as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.exists(), p.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 2000)
    rgb = np.asarray(im).astype(np.int32)
    gray = rgb.mean(axis=2)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colours) > 200                                     # text, tables, shaded cells, digits
    assert (gray < 30).sum() > 2 * 112 * 112 * 0.5                # the two templates' black backgrounds (and more)
    assert (gray > 240).mean() > 0.5                              # a page, not a black or blank screen
    # the templates sit in the page's upper part: dark pixels in two blocks side by side
    top = gray[:1000] < 30
    cols = np.flatnonzero(top.sum(axis=0) > 50)
    assert len(cols) >= 2 * 100 and cols.max() - cols.min() > 200


def test_names_from_the_data_are_literal_in_the_markdown_report():
    """A class folder named `a|b` or `<img ...>` neither splits a table nor injects markup into
    report.md or the UI's Markdown artifact."""
    import re

    from pixelsim.tasks.report import render_markdown

    classes = ["a|b", "<img src=x onerror=alert(1)>", "*x*"]
    n = len(classes)
    rep = {"dataset": "d", "source": {"url": "u", "sha256": "0" * 64}, "classes": classes,
           "counts": {s: {c: 1 for c in classes} for s in ("train", "valid")}, "metric": "l1",
           "metrics": {"l1": {"balanced": 1.0, "overall": 1.0, "per_class": {c: 1.0 for c in classes},
                              "confusion": [[int(i == j) for j in range(n)] for i in range(n)]}},
           "notes": ["file <b>x|y</b>.png beside the class folders ignored"], "artifacts": {}}
    text = render_markdown(rep)
    assert not re.search(r"(?<!\\)[<>]", text) and "\\<img src=x onerror=alert(1)\\>" in text
    for line in text.splitlines():
        if line.startswith("|"):   # every table row has its table's column count
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            assert len(cells) in (3, 4, n + 1), line
