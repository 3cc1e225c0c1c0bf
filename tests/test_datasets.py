"""End to end on generated datasets: layouts, class subsets, local folders, image modes.

Every archive is built here in memory (numpy + Pillow + tarfile/zipfile), served from
127.0.0.1, and run through the `pixelsim` CLI; expected figures are recomputed in the test
with plain PIL + numpy, independently of the product's code.
"""
from __future__ import annotations

import functools
import glob
import io
import json
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import PIXELSIM, TINY, TINY_FIGURES, assert_figures, base_env

DIGITS = [str(i) for i in range(10)]
N_TRAIN, N_TEST = 40, 15


# -- building archives ------------------------------------------------------------------

def png(array: np.ndarray | Image.Image) -> bytes:
    im = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def tgz(members: dict[str, bytes | None]) -> bytes:
    """A gzipped tar; a value of None is an explicit directory entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zipped(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@functools.cache
def digits() -> dict[str, tuple[list[bytes], list[bytes]]]:
    """MNIST-like ten classes: each a blurry blob pattern, jittered, under strong noise.

    Returns class -> (train PNGs, test PNGs), 28x28 8-bit grayscale, fixed seed.
    """
    rng = np.random.default_rng(20240607)
    yy, xx = np.mgrid[0:28, 0:28]
    out = {}
    for c in DIGITS:
        pattern = np.zeros((28, 28))
        for _ in range(3):
            cy, cx = rng.uniform(6, 22, 2)
            s = rng.uniform(2.5, 5)
            pattern += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        pattern = pattern / pattern.max() * 200
        images = []
        for _ in range(N_TRAIN + N_TEST):
            shifted = np.roll(pattern, tuple(rng.integers(-2, 3, 2)), (0, 1))
            images.append(png(np.clip(shifted + rng.normal(0, 80, (28, 28)), 0, 255).astype(np.uint8)))
        out[c] = (images[:N_TRAIN], images[N_TRAIN:])
    return out


def digit_members(classes: list[str], train: str, valid: str, top: str = "") -> dict[str, bytes]:
    """`<top>/<train>/<class>/<id>.png` and `<top>/<valid>/<class>/<id>.png`, MNIST-style ids."""
    members: dict[str, bytes] = {}
    ident = 0
    for c in classes:
        tr, te = digits()[c]
        for split, images in ((train, tr), (valid, te)):
            for data in images:
                members[f"{top}{split}/{c}/{ident}.png"] = data
                ident += 1
    return members


@functools.cache
def ten_class_tgz() -> bytes:
    return tgz(digit_members(DIGITS, "training", "testing", top="mnist_png/"))


def two_class_members(n_train: int = 6, n_valid: int = 3, top: str = "ds/") -> dict[str, bytes]:
    """A small 3-vs-7 set: 3s bright on the left, 7s on the right, with noise."""
    rng = np.random.default_rng(7)
    members = {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        for c, side in (("3", slice(0, 14)), ("7", slice(14, 28))):
            for i in range(n):
                a = rng.integers(0, 90, (28, 28)).astype(np.uint8)
                a[:, side] += 150
                members[f"{top}{split}/{c}/{i}.png"] = png(a)
    return members


@functools.cache
def modes_archive() -> tuple[bytes, dict[str, Image.Image]]:
    """Two classes whose files come in every supported flavour, and the source images.

    train/3: RGB PNGs; train/7: palette PNGs; valid/3: 16-bit grayscale PNGs (one holding
    65535, 32768, 1000 and 0); valid/7: 8-bit PNGs and one real JPEG named .jpg.
    """
    rng = np.random.default_rng(11)
    sources: dict[str, Image.Image] = {}
    for i in range(6):
        a = rng.integers(0, 256, (28, 28, 3)).astype(np.uint8)
        a[:, :14, 0] = 250
        sources[f"ds/train/3/{i}.png"] = Image.fromarray(a)
        im = Image.frombytes("P", (28, 28), rng.integers(0, 4, (28, 28)).astype(np.uint8).tobytes())
        im.putpalette(rng.integers(0, 256, 4 * 3).tolist())
        sources[f"ds/train/7/{i}.png"] = im
    for i in range(3):
        v = rng.integers(0, 65536, (28, 28)).astype(np.uint16)
        if i == 1:
            v[:] = 1000
            v[0, 0], v[0, 1], v[27, 27] = 65535, 32768, 0
        sources[f"ds/valid/3/{i}.png"] = Image.fromarray(v)
    for i in range(2):
        sources[f"ds/valid/7/{i}.png"] = Image.fromarray(rng.integers(0, 256, (28, 28)).astype(np.uint8))
    members = {name: png(im) for name, im in sources.items()}
    yy, xx = np.mgrid[0:28, 0:28]
    members["ds/valid/7/2.jpg"] = jpeg(((yy * 9 + xx * 3) % 256).astype(np.uint8))
    sources["ds/valid/7/2.jpg"] = Image.open(io.BytesIO(members["ds/valid/7/2.jpg"]))
    assert Image.open(io.BytesIO(members["ds/train/7/0.png"])).mode == "P"
    assert Image.open(io.BytesIO(members["ds/valid/3/1.png"])).mode.startswith("I")  # a real 16-bit PNG
    return tgz(members), sources


MODES_COUNTS = {"train": {"3": 6, "7": 6}, "valid": {"3": 3, "7": 3}}


# -- reading results ----------------------------------------------------------------------

def independent_metrics(train: dict[str, list[bytes]], valid: dict[str, list[bytes]]) -> dict:
    """Nearest per-class mean by L1 and RMSE, computed with PIL + numpy only."""
    classes = list(train)

    def load(data: bytes) -> np.ndarray:
        return (np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255).reshape(-1)

    templates = np.stack([np.stack([load(d) for d in train[c]]).astype(np.float64).mean(axis=0)
                          for c in classes]).astype(np.float32)
    out = {}
    for metric in ("l1", "rmse"):
        confusion = np.zeros((len(classes), len(classes)), dtype=int)
        for i, c in enumerate(classes):
            for data in valid[c]:
                diff = load(data)[None, :] - templates
                dist = np.abs(diff).mean(axis=1) if metric == "l1" else np.sqrt((diff * diff).mean(axis=1))
                confusion[i, int(dist.argmin())] += 1
        per_class = np.diag(confusion) / confusion.sum(axis=1)
        out[metric] = {"per_class": {c: round(float(a), 4) for c, a in zip(classes, per_class)},
                       "balanced": round(float(per_class.mean()), 4),
                       "overall": round(float(np.diag(confusion).sum() / confusion.sum()), 4),
                       "confusion": confusion.tolist()}
    return out


def task_states(result) -> dict[str, list[str]]:
    """Task name (download, untar, convert, ...) -> final states of its runs, from the log."""
    states: dict[str, list[str]] = {}
    for m in re.finditer(r"Task run '([^']+)' - Finished in state (\w+)", result.stderr):
        states.setdefault(m.group(1).rsplit("-", 1)[0], []).append(m.group(2))
    return states


def shard_images(report: dict, split: str = "train") -> dict[str, bytes]:
    """archive path -> raw image bytes of every row of a split's shards."""
    rows = {}
    for shard in sorted(Path(report["artifacts"]["shards"]).glob(f"{split}-*.parquet")):
        table = pq.read_table(shard, columns=["path", "image"])
        rows.update(zip(table.column("path").to_pylist(), table.column("image").to_pylist()))
    return rows


def read_predictions(report: dict):
    """The predictions table, whether `artifacts.predictions` is a file, a folder or a glob."""
    where = report["artifacts"]["predictions"]
    if any(ch in where for ch in "*?["):
        files = sorted(glob.glob(where))
    elif Path(where).is_dir():
        files = sorted(glob.glob(f"{where}/*.parquet"))
    else:
        files = [where]
    assert files, where
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()


def error_line(result) -> str:
    assert result.code == 1, (result.code, result.stderr[-3000:])
    assert result.stdout == ""
    assert "pixelsim: error:" in result.stderr
    return result.stderr[result.stderr.index("pixelsim: error:"):]


def ok(result) -> dict:
    assert result.code == 0, result.stderr[-3000:]
    return result.report


# -- 1, 2: a ten-class MNIST-like archive ---------------------------------------------------

def test_ten_class_training_testing_layout_matches_independent_computation(cli, serve):
    url = serve({"mnist_png.tgz": ten_class_tgz()}) + "/mnist_png.tgz"
    rep = ok(cli("run", "--source", url, "--dataset", "mnist", "--json"))

    assert rep["classes"] == DIGITS
    assert rep["counts"] == {"train": {c: N_TRAIN for c in DIGITS}, "valid": {c: N_TEST for c in DIGITS}}
    assert rep["shape"] == [28, 28]
    want = independent_metrics({c: digits()[c][0] for c in DIGITS}, {c: digits()[c][1] for c in DIGITS})
    # the generated data is neither trivial nor hopeless, so these figures can catch mistakes
    assert 0.5 < want["l1"]["overall"] < 0.99 and 0.5 < want["rmse"]["overall"] < 0.99
    for metric in ("l1", "rmse"):
        assert rep["metrics"][metric] == want[metric], metric

    md = (Path(rep["artifacts"]["report"]) / "report.md").read_text()
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in md.splitlines() if line.startswith("|")]
    for c in DIGITS:
        per_class = [r for r in rows if r[:3] == [c, str(N_TRAIN), str(N_TEST)]]
        assert len(per_class) == 1, (c, md)
        assert {str(want["l1"]["per_class"][c]), str(want["rmse"]["per_class"][c])} <= set(per_class[0][3:]), c


def test_class_subset_equals_separate_two_class_zip(cli, serve):
    base = serve({"mnist_png.tgz": ten_class_tgz(),
                  "three_seven.zip": zipped(digit_members(["3", "7"], "train", "valid"))})
    subset = ok(cli("run", "--source", f"{base}/mnist_png.tgz", "--dataset", "mnist", "--classes", "3,7", "--json"))
    alone = ok(cli("run", "--source", f"{base}/three_seven.zip", "--dataset", "three_seven", "--json"))

    assert subset["classes"] == alone["classes"] == ["3", "7"]
    assert subset["counts"] == alone["counts"] == {"train": {"3": N_TRAIN, "7": N_TRAIN},
                                                   "valid": {"3": N_TEST, "7": N_TEST}}
    assert subset["metrics"] == alone["metrics"]
    assert alone["metrics"] == independent_metrics({c: digits()[c][0] for c in "37"},
                                                   {c: digits()[c][1] for c in "37"})


# -- 3: an already-extracted folder as the source ---------------------------------------------

def test_local_folder_source_then_cache_then_edit(cli, tmp_path):
    with tarfile.open(TINY) as tf:
        tf.extractall(tmp_path / "src", filter="data")
    folder = tmp_path / "src" / "mnist_tiny"
    counts = {split: {c: len(list((folder / split / c).glob("*.png"))) for c in ("3", "7")}
              for split in ("train", "valid")}

    first = cli("run", "--source", str(folder), "--dataset", "tiny", "--json")
    rep = ok(first)
    assert_figures(rep, TINY_FIGURES)
    assert rep["counts"] == {"train": counts["train"], "valid": counts["valid"]}
    assert rep["classes"] == ["3", "7"]
    assert set(first.states()) == {"Completed"}, first.states()

    again = cli("run", "--source", str(folder), "--dataset", "tiny", "--json")
    assert ok(again) == rep
    assert again.states() and set(again.states()) == {"Cached"}, again.states()

    # replace one training 3 by a 7: the source changed, so it must be read again
    victim = sorted((folder / "train" / "3").glob("*.png"))[0]
    shutil.copyfile(sorted((folder / "valid" / "7").glob("*.png"))[0], victim)
    edited = cli("run", "--source", str(folder), "--dataset", "tiny", "--json")
    rep2 = ok(edited)
    assert "Cached" not in task_states(edited)["download"], edited.states()
    assert rep2["source"]["sha256"] != rep["source"]["sha256"]
    assert rep2["counts"] == rep["counts"]
    assert "Cached" not in task_states(edited)["templates"]


# -- 4: image modes and layout quirks ------------------------------------------------------------

def test_mixed_sizes_fail_naming_the_file_unless_resized(cli, serve):
    members = two_class_members()
    odd = "ds/train/7/5.png"
    members[odd] = png(np.full((30, 30), 200, np.uint8))
    url = serve({"mixed.tgz": tgz(members)}) + "/mixed.tgz"

    err = error_line(cli("run", "--source", url, "--dataset", "mixed"))
    assert odd in err and "28x28" in err and "30x30" in err
    assert "ds/train/3/0.png" not in err  # only the odd one out is blamed

    rep = ok(cli("run", "--source", url, "--dataset", "mixed", "--resize", "28x28", "--json"))
    assert rep["shape"] == [28, 28]
    assert rep["counts"] == {"train": {"3": 6, "7": 6}, "valid": {"3": 3, "7": 3}}
    assert len(shard_images(rep)[odd]) == 28 * 28


def test_mixed_sizes_name_the_odd_file_even_when_it_comes_first(cli, serve):
    members = two_class_members()
    odd = "ds/train/3/0.png"  # the first file in class and path order
    members[odd] = png(np.full((30, 30), 200, np.uint8))
    url = serve({"first.tgz": tgz(members)}) + "/first.tgz"
    err = error_line(cli("run", "--source", url, "--dataset", "first"))
    assert odd in err and "28x28" in err and "30x30" in err, err


def test_modes_as_one_channel_rgb_palette_16bit_jpeg(cli, serve):
    data, sources = modes_archive()
    url = serve({"modes.tgz": data}) + "/modes.tgz"
    rep = ok(cli("run", "--source", url, "--dataset", "modes", "--channels", "1", "--json"))
    assert rep["shape"] == [28, 28]
    assert rep["counts"] == MODES_COUNTS
    stored = {**shard_images(rep, "train"), **shard_images(rep, "valid")}
    assert {len(b) for b in stored.values()} == {784}

    def gray(name: str) -> np.ndarray:
        return np.frombuffer(stored[name], np.uint8).reshape(28, 28)

    # RGB: Pillow's luma
    assert (gray("ds/train/3/2.png") == np.asarray(sources["ds/train/3/2.png"].convert("L"))).all()
    # palette: Pillow's convert("L") of each pixel's palette colour
    for name in ("ds/train/7/0.png", "ds/train/7/5.png"):
        assert (gray(name) == np.asarray(sources[name].convert("L"))).all(), name
    # 16-bit: scaled to 0..255 (v * 255 / 65535, rounded), not clipped
    deep = gray("ds/valid/3/1.png")
    assert (deep[0, 0], deep[0, 1], deep[27, 27], deep[5, 5]) == (255, 128, 0, 4)
    v = np.asarray(sources["ds/valid/3/0.png"]).astype(np.int64)
    assert (gray("ds/valid/3/0.png") == np.rint(v * 255 / 65535)).all()
    # a real JPEG named .jpg is read like any image
    jpg = np.asarray(sources["ds/valid/7/2.jpg"].convert("L")).astype(int)
    assert np.abs(gray("ds/valid/7/2.jpg").astype(int) - jpg).max() <= 2


def test_modes_as_three_channels(cli, serve):
    data, sources = modes_archive()
    url = serve({"modes.tgz": data}) + "/modes.tgz"
    rep = ok(cli("run", "--source", url, "--dataset", "modes", "--channels", "3", "--json"))
    assert rep["shape"] == [28, 28, 3]
    assert rep["counts"] == MODES_COUNTS
    stored = {**shard_images(rep, "train"), **shard_images(rep, "valid")}
    assert {len(b) for b in stored.values()} == {2352}

    def rgb(name: str) -> np.ndarray:
        return np.frombuffer(stored[name], np.uint8).reshape(28, 28, 3)

    assert (rgb("ds/train/3/2.png") == np.asarray(sources["ds/train/3/2.png"])).all()
    assert (rgb("ds/train/7/1.png") == np.asarray(sources["ds/train/7/1.png"].convert("RGB"))).all()
    deep = rgb("ds/valid/3/1.png")
    assert deep[0, 0].tolist() == [255] * 3 and deep[0, 1].tolist() == [128] * 3


def test_jpeg_named_png_is_refused(cli, serve):
    members = two_class_members()
    liar = "ds/train/3/4.png"
    members[liar] = jpeg(np.full((28, 28), 90, np.uint8))
    url = serve({"fake.tgz": tgz(members)}) + "/fake.tgz"
    err = error_line(cli("run", "--source", url, "--dataset", "fake"))
    assert liar in err and "JPEG" in err
    assert "ds/train/3/3.png" not in err


def test_empty_training_class_folder_is_dropped_with_a_note(cli, serve):
    members: dict[str, bytes | None] = {"ds/": None, "ds/train/": None, "ds/train/5/": None}
    members.update(two_class_members())
    url = serve({"empty.tgz": tgz(members)}) + "/empty.tgz"
    rep = ok(cli("run", "--source", url, "--dataset", "empty", "--json"))
    assert rep["classes"] == ["3", "7"]
    assert rep["counts"] == {"train": {"3": 6, "7": 6}, "valid": {"3": 3, "7": 3}}
    assert any("train/5" in note for note in rep["notes"]), rep["notes"]


def test_validation_class_without_training_folder_is_an_error(cli, serve):
    members = two_class_members()
    members["ds/valid/9/0.png"] = png(np.zeros((28, 28), np.uint8))
    url = serve({"orphan.tgz": tgz(members)}) + "/orphan.tgz"
    err = error_line(cli("run", "--source", url, "--dataset", "orphan"))
    assert "ds/valid/9" in err


def test_unlabeled_test_folder_is_noted_and_valid_is_used(cli, serve):
    members = two_class_members()
    for i in range(4):
        members[f"ds/test/{i}.png"] = png(np.full((28, 28), 60 * i, np.uint8))
    url = serve({"tiny_like.tgz": tgz(members)}) + "/tiny_like.tgz"
    rep = ok(cli("run", "--source", url, "--dataset", "tiny_like", "--json"))
    assert rep["classes"] == ["3", "7"]
    assert rep["counts"] == {"train": {"3": 6, "7": 6}, "valid": {"3": 3, "7": 3}}
    assert any("test/" in note for note in rep["notes"]), rep["notes"]
    preds = read_predictions(rep)
    assert len(preds) == 2 * 6 and preds.path.str.startswith("ds/valid/").all()
    # the halves are easy to tell apart: this also checks evaluation ran on the right images
    assert rep["metrics"]["l1"]["per_class"] == {"3": 1.0, "7": 1.0}


# -- 5: the named datasets ---------------------------------------------------------------------

def test_datasets_lists_names_and_urls(tmp_path):
    r = subprocess.run([PIXELSIM, "datasets"], env=base_env(tmp_path / "home"), capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    want = {"mnist_sample": "https://s3.amazonaws.com/fast-ai-sample/mnist_sample.tgz",
            "mnist_tiny": "https://s3.amazonaws.com/fast-ai-sample/mnist_tiny.tgz",
            "mnist": "https://s3.amazonaws.com/fast-ai-imageclas/mnist_png.tgz"}
    for name, url in want.items():
        at = [i for i, line in enumerate(lines) if line.split() and line.split()[0] == name]
        assert len(at) == 1, (name, r.stdout)
        block = " ".join(lines[at[0]:at[0] + 2])
        assert url in block.split(), (name, r.stdout)


def test_datasets_say_which_work_offline(tmp_path, monkeypatch):
    import pixelsim
    from conftest import free_port

    root = tmp_path / "root"
    monkeypatch.setenv("PIXELSIM_URL_MNIST_SAMPLE", f"http://127.0.0.1:{free_port()}/mnist_sample.tgz")

    def listed() -> dict[str, str]:
        r = subprocess.run([PIXELSIM, "datasets", "--root", str(root)], env=base_env(tmp_path / "home"),
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        return {lines[i].split()[0]: lines[i + 1].rsplit("(", 1)[1].rstrip(")") for i in range(0, len(lines), 2)}

    assert listed() == {"mnist_sample": "bundled copy, works offline", "mnist_tiny": "needs the network once",
                        "mnist": "needs the network once"}
    pixelsim.run("mnist_sample", root=str(root))   # the official URL is closed: the bundled copy fills the root
    assert listed()["mnist_sample"] == "in the root, no network needed"


def test_names_from_the_archive_cannot_drive_the_terminal(cli, tmp_path):
    """A class folder whose name holds a newline, ANSI colours and a bidi override: every line
    pixelsim prints is its own, and no control character reaches the terminal."""
    evil = "3\nINJECTED: pixelsim: error: fake\x1b[31mRED\x1b[0m\u202e"
    members = {k.replace("/3/", f"/{evil}/"): v for k, v in two_class_members().items()}
    members[f"ds/train/{evil}/bad.png"] = b"\x89PNG\r\n\x1a\n not really"
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(tgz(members))
    failed = cli("run", "--source", str(archive))
    skipped = cli("run", "--source", str(archive), "--skip-bad", "1")
    assert skipped.code == 0, skipped.stderr[-2000:]
    for out in (failed.stderr, skipped.stdout, skipped.stderr):
        assert "\x1b" not in out and "\u202e" not in out, out
        assert not any(line.startswith("INJECTED") for line in out.splitlines()), out
    assert "pixelsim: error: 1 bad image file(s):" in failed.stderr and "3\\nINJECTED" in failed.stderr
    assert "accuracy on 3\\nINJECTED: pixelsim: error: fake\\x1b[31mRED\\x1b[0m\\u202e:" in skipped.stdout
    stored, = (cli.root / "reports").glob("*/*/report.json")
    assert json.loads(stored.read_text())["classes"] == sorted([evil, "7"])   # the data itself keeps the name


def test_files_below_a_class_folder_are_named_in_a_note_never_dropped_silently(tmp_path):
    import pixelsim

    members = two_class_members()
    moved = {k.replace("/train/7/", "/train/7/extra/") if k.endswith(("0.png", "1.png")) else k: v
             for k, v in members.items()}
    archive = tmp_path / "deeper.tgz"
    archive.write_bytes(tgz(moved))
    rep = pixelsim.run(source=str(archive), root=str(tmp_path / "root")).report
    assert rep["counts"]["train"] == {"3": 6, "7": 4}
    assert "2 file(s) in subfolders of ds/train/<class>/ ignored (only a class folder's own files are read), " \
           "e.g. ds/train/7/extra/0.png" in rep["notes"]
    # a validation class left without images is said, not averaged away in silence
    gone = {k.replace("/valid/7/", "/valid/7/sub/"): v for k, v in members.items()}
    archive.write_bytes(tgz(gone))
    rep = pixelsim.run(source=str(archive), root=str(tmp_path / "root")).report
    assert rep["counts"]["valid"]["7"] == 0 and rep["metrics"]["l1"]["per_class"]["7"] is None
    assert any(n.startswith("no validation image of class(es) 7 in ds/valid/: no accuracy for them") for n in rep["notes"])
    # a training class left without images is an error that says why (no --skip-bad was given)
    empty = {k.replace("/train/7/", "/train/7/sub/"): v for k, v in members.items()}
    archive.write_bytes(tgz(empty))
    with pytest.raises(pixelsim.PixelsimError, match=r"class 7: ds/train/7/ holds no image directly \(6 file\(s\) in "
                                                     r"subfolders of the class folders, e.g. ds/train/7/sub/0.png"):
        pixelsim.run(source=str(archive), root=str(tmp_path / "root"))


def test_a_class_name_too_long_for_a_file_name_still_gets_its_template(tmp_path):
    """Inside an archive a class folder's name may be longer than a file name can be (255 bytes):
    its template picture is named by the name's digest, and the figures are the usual ones."""
    import pixelsim
    from pixelsim.storage import catalog
    long = "a" * 300
    archive = tmp_path / "long.tgz"
    with tarfile.open(TINY) as src, tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as out:
        for m in src.getmembers():
            if m.isfile() and m.name.endswith(".png"):
                data = src.extractfile(m).read()
                m.name = m.name.replace("/3/", f"/{long}/")
                out.addfile(m, io.BytesIO(data))
    result = pixelsim.run(source=str(archive), root=str(tmp_path / "root"))
    assert result.report["classes"] == ["7", long]
    got = result.report["metrics"]["l1"]["per_class"]
    assert (got[long], got["7"], result.report["metrics"]["l1"]["balanced"]) == (
        TINY_FIGURES["l1"]["3"], TINY_FIGURES["l1"]["7"], TINY_FIGURES["l1"]["balanced"])
    folder = Path(result.outputs.templates.uri())
    pictures = catalog.template_images(["7", long])
    assert pictures[1].startswith("class-") and (folder / pictures[1]).is_file()
    assert (folder / "7.png").is_file() and catalog.template_images(["3\nx"]) != ["3\nx.png"]


def test_classes_that_differ_only_in_case_or_unicode_form_get_pictures_of_their_own(tmp_path):
    """On macOS and Windows `A.png` and `a.png` (or an NFC and an NFD `é`) are one file: such
    classes get digest names, so no template picture overwrites another's."""
    import unicodedata

    import pixelsim
    from pixelsim.storage import catalog
    archive = tmp_path / "cased.tgz"
    with tarfile.open(TINY) as src, tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as out:
        for m in src.getmembers():
            if m.isfile() and m.name.endswith(".png"):
                data = src.extractfile(m).read()
                m.name = m.name.replace("/3/", "/a/").replace("/7/", "/A/")
                out.addfile(m, io.BytesIO(data))
    result = pixelsim.run(source=str(archive), root=str(tmp_path / "root"))
    assert result.report["classes"] == ["A", "a"]
    folder = Path(result.outputs.templates.uri())
    pictures = catalog.template_images(["A", "a"])
    assert all(p.startswith("class-") for p in pictures) and len({p.casefold() for p in pictures}) == 2
    assert (folder / pictures[0]).read_bytes() != (folder / pictures[1]).read_bytes()
    nfc, nfd = unicodedata.normalize("NFC", "é"), unicodedata.normalize("NFD", "é")
    names = catalog.template_images(["7", nfc, nfd, "class-x", "CLASS-Y", "b", "B2"])
    assert names[0] == "7.png" and names[5:] == ["b.png", "B2.png"]
    assert len({unicodedata.normalize("NFC", n).casefold() for n in names}) == len(names)
