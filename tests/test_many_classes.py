"""What a report renders grows with the number of classes, never with its square: beyond
MAX_MATRIX classes the pages show the most frequent mistakes, and the whole matrix is a CSV."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from conftest import plain_pipeline
from pixelsim.storage.artifacts import MAX_MATRIX, MAX_PICTURES
from pixelsim.storage.images import encode_png

CLASSES = 120


def archive(path: Path, classes: int = CLASSES) -> Path:
    """Two training and one validation 8x8 image per class; validation images of class c look
    like class c+1's, so every one is a mistake and each mistake is its own matrix cell."""
    rng = np.random.default_rng(1)
    looks = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(classes)]
    with tarfile.open(path, "w:gz") as tf:
        for c in range(classes):
            for name, img in (("train/a", looks[c]), ("train/b", looks[c]), ("valid/a", looks[(c + 1) % classes])):
                data = encode_png(img)
                split, stem = name.split("/")
                info = tarfile.TarInfo(f"many/{split}/c{c:03d}/{stem}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_a_report_of_many_classes_lists_mistakes_not_a_matrix(tmp_path):
    out = plain_pipeline(str(tmp_path / "root"), archive(tmp_path / "many.tgz"), dataset="many")
    rep = out.report
    assert len(rep["classes"]) == CLASSES > MAX_PICTURES > MAX_MATRIX
    l1 = rep["metrics"]["l1"]
    assert "confusion" not in l1 and l1["per_class"]["c000"] == 0.0
    assert len(l1["confusion_pairs"]) == CLASSES                      # one non-zero cell per validation image
    assert ["c000", "c001", 1] in l1["confusion_pairs"]
    folder = Path(rep["artifacts"]["report"])
    assert json.loads((folder / "report.json").read_text())["metrics"] == rep["metrics"]
    text = (folder / "report.md").read_text()
    assert "## Most frequent mistakes (l1)" in text and "## Confusion" not in text
    assert "| c000 | c001 | 1 |" in text
    page = (folder / "report.html").read_text()
    assert 'class="conf"' not in page and "whole matrix is in confusion-l1.csv" in page
    assert page.count('class="pix template"') == MAX_PICTURES and f"The first {MAX_PICTURES} of {CLASSES}" in page
    assert len(page) < 150_000 and len(text) < 40_000                  # a dense matrix alone would be larger
    ev = Path(out.outputs.evaluation.root) / out.outputs.evaluation.dir   # the evaluation's records too
    stored = json.loads((ev / "_metrics.json").read_text())["metrics"]["l1"]
    assert "confusion" not in stored and len(stored["cells"]) == CLASSES
    rows = (folder / "confusion-l1.csv").read_text().splitlines()
    assert len(rows) == CLASSES + 1 and rows[1].split(",")[1:4] == ["0", "1", "0"]   # the CSV stays whole


def test_the_ui_shows_the_first_templates_and_no_column_per_class(tmp_path):
    from pixelsim.flows.ui import history_table, template_images
    out = plain_pipeline(str(tmp_path / "root"), archive(tmp_path / "many.tgz"), dataset="many")
    lines = template_images(out.outputs.templates)
    assert sum(line.count("<img ") for line in lines) == MAX_PICTURES
    assert any(f"The first {MAX_PICTURES} of {CLASSES} classes" in line for line in lines)
    from datetime import datetime
    row = {"time": datetime(2026, 1, 1), "run_id": "r" * 32, "balanced": 0.0, "total_seconds": 1.0, "steps": [],
           "per_class": [{"class": c, "accuracy": 0.0} for c in out.report["classes"]]}
    (shown,) = history_table([row])
    assert set(shown) == {"time", "run", "balanced", "change", "cached steps", "seconds"}


def test_a_class_named_like_a_history_column_cannot_replace_it():
    """Classes called balanced, change, time, run, seconds or "cached steps" are columns of their own."""
    from datetime import datetime

    from pixelsim.flows.ui import history_table
    fixed = ["time", "run", "balanced", "change", "cached steps", "seconds"]
    row = {"time": datetime(2026, 1, 1), "run_id": "r" * 32, "balanced": 0.9314, "total_seconds": 1.0,
           "steps": [{"step": "download", "seconds": 0.1, "cached": True}],
           "per_class": [{"class": c, "accuracy": 0.125} for c in fixed]}
    (shown,) = history_table([row])
    assert (shown["balanced"], shown["run"], shown["cached steps"], shown["seconds"]) == (0.9314, "r" * 8, 1, 1.0)
    assert all(shown[f"class {c}"] == 0.125 for c in fixed) and len(shown) == 2 * len(fixed)
