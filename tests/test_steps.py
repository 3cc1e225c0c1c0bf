"""The plain step functions and storage pieces, without Prefect."""
from __future__ import annotations

import os
import io
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import TINY_FIGURES, plain_pipeline
from pixelsim.storage.errors import ImageError, IntegrityError, LayoutError
from pixelsim.storage.layout import find_layout, natural_key, split_files
from pixelsim.storage.catalog import step_key
from pixelsim.storage.root import Root
from pixelsim.storage.shards import ShardMeta, iter_arrays, read_meta, write_shard
from pixelsim.tasks.contracts import Output
from pixelsim.tasks.download import archive_name
from pixelsim.tasks.evaluate import accuracy, confusion_matrix, distances
from pixelsim.tasks.report import render_markdown
from pixelsim.tasks.templates import class_means


def test_distances_match_a_hand_computed_example():
    x = torch.tensor([[0.0, 0.5, 1.0, 1.0]])
    t = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # |0|+|.5|+|1|+|1| = 2.5 / 4 ; |1|+|.5|+0+0 = 1.5 / 4
    assert distances(x, t, "l1").tolist() == [[0.625, 0.375]]
    # sqrt((0+.25+1+1)/4) = 0.75 ; sqrt((1+.25)/4) = sqrt(.3125)
    rmse = distances(x, t, "rmse")[0].tolist()
    assert rmse[0] == pytest.approx(0.75) and rmse[1] == pytest.approx(0.3125 ** 0.5)
    with pytest.raises(ValueError):
        distances(x, t, "cosine")


def test_streaming_mean_equals_full_mean():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(1000, 784), dtype=np.uint8)
    labels = rng.integers(0, 3, size=1000)
    batches = [(labels[i:i + 97], images[i:i + 97]) for i in range(0, 1000, 97)]
    means, counts = class_means(batches, 3)
    for c in range(3):
        full = torch.from_numpy(images[labels == c]).float().div(255).mean(0).numpy()
        assert np.allclose(means[c], full, atol=1e-6)
        assert counts[c] == (labels == c).sum()
    # the order of batches does not change a single bit
    again, _ = class_means(reversed(batches), 3)
    assert np.array_equal(means, again)


def test_accuracy_per_class_balanced_overall_confusion():
    labels = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 0])
    m = accuracy(confusion_matrix(labels, pred, 3))
    assert m["per_class"] == [0.75, 0.5, None]
    assert m["balanced"] == 0.625
    assert m["overall"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[3, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_shard_round_trip_and_readers(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    meta = ShardMeta(shape=(4, 3), classes=["a", "b"], split="train", source_sha256="ab" * 32)
    write_shard(str(tmp_path / "s.parquet"), meta, [f"p{i}.png" for i in range(5)], np.array([0, 1, 1, 0, 1]), imgs)
    root = Root(str(tmp_path))
    (batch,) = iter_arrays(root, ["s.parquet"], ("path", "label_index", "image"))
    assert np.array_equal(batch["image"].reshape(5, 4, 3), imgs)
    assert batch["label_index"].tolist() == [0, 1, 1, 0, 1]
    assert batch["path"] == [f"p{i}.png" for i in range(5)]
    assert read_meta(root, "s.parquet")["shape"] == [4, 3]
    # the same pixels through the analysts' tools
    df = pq.read_table(tmp_path / "s.parquet").to_pandas()
    assert df.label.tolist() == ["a", "b", "b", "a", "b"]
    assert np.frombuffer(df.image[2], np.uint8).reshape(4, 3).tolist() == imgs[2].tolist()
    assert duckdb.sql(f"select count(*), sum(octet_length(image)) from '{tmp_path}/s.parquet'").fetchall() == [(5, 60)]
    pdf = pl.read_parquet(tmp_path / "s.parquet")
    assert list(pdf["image"][4]) == imgs[4].ravel().tolist()


def test_layout_finds_splits_classes_and_notes():
    paths = ["data/train/10/a.png", "data/train/9/b.png", "data/train/2/c.png", "data/test/x.png",
             "data/valid/9/d.png", "data/valid/10/e.png", "data/labels.csv", "data/train/.DS_Store"]
    lay = find_layout(paths)
    assert (lay.base, lay.train, lay.valid, lay.classes) == ("data", "train", "valid", ["2", "9", "10"])
    assert any("test/ ignored" in n for n in lay.notes)
    assert split_files(paths, lay, "valid") == [("data/valid/9/d.png", 1), ("data/valid/10/e.png", 2)]
    assert sorted(["x10", "x9", "x1"], key=natural_key) == ["x1", "x9", "x10"]
    with pytest.raises(LayoutError, match="data/valid/4/"):
        find_layout(paths + ["data/valid/4/f.png"])
    empty = find_layout(paths, folders=["data/train/5", "data/train"])
    assert empty.classes == ["2", "9", "10"] and any("data/train/5/ ignored" in n for n in empty.notes)
    with pytest.raises(LayoutError, match="training split"):
        find_layout(["valid/3/a.png"])
    assert find_layout(paths, classes=["10", "2"]).classes == ["2", "10"]


def test_usual_split_names_are_found_in_any_case_and_an_asked_name_exactly():
    """Train/ and VALID/ (a Windows or macOS export) are the usual splits in another case: they
    were "no training split folder found"; the exact spelling wins where both are there."""
    paths = ["Train/3/a.png", "Train/7/b.png", "VALID/3/c.png", "VALID/7/d.png"]
    lay = find_layout(paths)
    assert (lay.train, lay.valid, lay.classes) == ("Train", "VALID", ["3", "7"])
    assert split_files(paths, lay, lay.valid) == [("VALID/3/c.png", 0), ("VALID/7/d.png", 1)]
    both = find_layout(paths + ["train/3/e.png", "train/7/f.png"])
    assert both.train == "train" and any("Train/ ignored" in n for n in both.notes)
    with pytest.raises(LayoutError, match="training split"):
        find_layout(paths, train_split="train")   # a name asked for is a folder's exact name
    assert find_layout(paths, train_split="Train").train == "Train"


def test_a_second_tree_with_splits_of_its_own_is_named_in_the_notes_not_skipped_silently():
    """Two datasets in one archive (a/train, a/valid and b/train, b/valid): one is read, the
    notes name the other, so the figures never stand for a tree the user did not mean unsaid."""
    tree = ["a/train/3/x.png", "a/train/7/y.png", "a/valid/3/z.png", "a/valid/7/w.png"]
    rivals = [f"{d}/train/3/x.png" for d in ("b", "c/deep", "z1", "z2", "z3", "z4")]
    lay = find_layout(tree + rivals)
    assert lay.base == "a"
    named = [n for n in lay.notes if "holds a split folder of its own" in n]
    assert [n.split("/")[0].removeprefix("folder ") for n in named] == ["b", "z1", "z2", "z3", "z4"]
    assert "only a/ (the shallowest, first by name) is read" in named[0]
    assert lay.notes[-1] == "... and 1 more such folder(s) ignored"   # c/deep, the deepest
    assert not [n for n in find_layout(tree + ["a/train/3/train/q.png"]).notes if "of its own" in n]
    # a dot-folder in a class's place is hidden like any dotfile, and said: it may be a class
    dotted = find_layout(tree + ["a/train/.ipynb_checkpoints/x.png"], folders=["a/train/.ipynb_checkpoints"]).notes
    assert "folder a/train/.ipynb_checkpoints/ ignored: its name starts with a dot (hidden); rename it if it is a class" \
        in dotted
    # however many strays of one kind, the notes name a few and count the rest
    strays = find_layout(tree + [f"a/train/stray{i}.txt" for i in range(12)]).notes
    assert len([n for n in strays if n.startswith("file stray")]) == 5
    assert "... and 7 more file(s) beside the class folders ignored" in strays


def test_a_validation_class_that_differs_from_a_training_class_only_in_unicode_form_or_case_is_named_so():
    """The two look alike on screen: the error says how they differ, by code point."""
    import unicodedata
    nfc, nfd = unicodedata.normalize("NFC", "é"), unicodedata.normalize("NFD", "é")
    with pytest.raises(LayoutError) as e:
        find_layout([f"d/train/{nfc}/x.png", "d/train/7/y.png", f"d/valid/{nfd}/z.png", "d/valid/7/w.png"])
    assert str(e.value).endswith('; "e\\u0301" differs from the training class "\\xe9" only in Unicode form (NFC/NFD: '
                                 'rename one)')
    with pytest.raises(LayoutError, match='"cat" differs from the training class "Cat" only in case'):
        find_layout(["d/train/Cat/x.png", "d/train/7/y.png", "d/valid/cat/z.png", "d/valid/7/w.png"])


def test_names_equal_by_number_have_one_order_in_every_process():
    """Class folders "3", "03" and "003" tie by number: their text decides, not the hash seed of
    the process (a set's order), so reruns find the same classes, labels and cache keys."""
    import subprocess
    import sys
    code = ("from pixelsim.storage.layout import find_layout; print(find_layout(['train/3/a.png', 'train/03/b.png', "
            "'train/003/c.png', 'train/10/d.png', 'valid/3/e.png', 'valid/03/f.png']).classes)")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert seen == {"['003', '03', '3', '10']\n"}
    assert sorted(["img3.png", "img03.png", "img2.png"], key=natural_key) == ["img2.png", "img03.png", "img3.png"]
    # a valid/ of empty class folders beside a test/ that holds the images: test/ is used
    beside = ["d/train/3/a.png", "d/train/7/b.png", "d/test/3/c.png", "d/test/7/e.png"]
    lay = find_layout(beside, folders=["d/valid/3", "d/valid/7"])
    assert lay.valid == "test" and "split folder valid/ ignored: its class folders hold no files" in lay.notes


def test_atomic_publication_leaves_nothing_on_failure(tmp_path):
    root = Root(str(tmp_path))
    with pytest.raises(RuntimeError):
        with root.publish_dir("a/b") as st:
            st.write_bytes("x.bin", b"half")
            raise RuntimeError("crash mid-write")
    assert not (tmp_path / "a" / "b").exists()
    assert [p.name for p in (tmp_path / "a").iterdir()] == []
    with root.publish_dir("a/b") as st:
        st.write_bytes("x.bin", b"whole")
    out = Output(root=str(tmp_path), dir="a/b", digest=st.digest)
    out.verify()
    (tmp_path / "a" / "b" / "x.bin").write_bytes(b"whola")
    with pytest.raises(IntegrityError, match="x.bin"):
        out.verify()
    (tmp_path / "a" / "b" / "x.bin").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        out.verify()


def test_cache_keys_depend_on_step_version_and_content():
    a = step_key("templates", "1", "x")
    assert a == step_key("templates", "1", "x") and len(a) == 16
    assert a != step_key("evaluate", "1", "x")
    assert a != step_key("templates", "2", "x")
    assert a != step_key("templates", "1", "y")


def test_archive_name_is_safe():
    assert archive_name("https://h/x/mnist_sample.tgz?sig=1") == "mnist_sample.tgz"
    assert archive_name("/a/b/../..") == "archive" or ".." not in archive_name("/a/b/../..")


@pytest.fixture(scope="module")
def tiny_steps(tmp_path_factory):
    """The plain functions chained on the real tiny archive."""
    root = str(tmp_path_factory.mktemp("root"))
    out = plain_pipeline(root).outputs
    return root, out.archive, out.tree, out.shards, out.templates, out.evaluation, out.report


def test_plain_pipeline_on_tiny(tiny_steps):
    root, archive, tree, shards, tmpl, ev, rep = tiny_steps
    for output in (archive, tree, shards, tmpl, ev, rep):
        output.verify()
        # the record in the manifest rebuilds the same output from the root alone
        assert type(output).load(root, output.dir) == output
    assert shards.counts == {"train": {"3": 350, "7": 350}, "valid": {"3": 350, "7": 350}}
    assert [Path(p).name for p in shards.shards["train"]] == ["train-00000-of-00003.parquet",
                                                               "train-00001-of-00003.parquet",
                                                               "train-00002-of-00003.parquet"]
    r = rep.report
    for metric, want in TINY_FIGURES.items():
        assert r["metrics"][metric]["balanced"] == want["balanced"]
        assert r["metrics"][metric]["per_class"] == {"3": want["3"], "7": want["7"]}
    md = render_markdown(r)
    assert "| 3 | 350 | 350 | 0.8829 | 0.9429 |" in md
    # template PNGs are viewable images of the means
    png = Image.open(Path(root) / tmpl.dir / "3.png")
    assert png.size == (28, 28) and png.mode == "L"
    meta = read_meta(Root(root), shards.shards["valid"][0])
    assert meta["classes"] == ["3", "7"] and meta["source_sha256"] == archive.sha256


def test_convert_lists_every_bad_file(tmp_path):
    buf = io.BytesIO()
    good = io.BytesIO()
    Image.new("L", (28, 28), 7).save(good, "PNG")
    files = {"d/train/a/1.png": good.getvalue(), "d/train/a/2.png": b"junk", "d/train/b/1.png": good.getvalue(),
             "d/valid/a/1.png": good.getvalue(), "d/valid/b/9.png": b""}
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "a.tgz").write_bytes(buf.getvalue())
    root = str(tmp_path / "root")
    with pytest.raises(ImageError) as e:
        plain_pipeline(root, tmp_path / "a.tgz", "d")
    assert "2 bad image file(s)" in str(e.value)
    assert "d/train/a/2.png" in str(e.value) and "d/valid/b/9.png" in str(e.value)
    assert list((tmp_path / "root").glob("shards/*/*/*.parquet")) == []


@pytest.mark.parametrize("one_number, longest", [(True, 15), (True, 30), (False, 15)],
                         ids=["one-number-names", "numbers-beyond-int64", "any-names"])
def test_split_order_is_natural_on_the_vectorized_path_and_the_fallback(one_number, longest):
    """split_rows sorts in Arrow when every name holds one number; either way the order is
    the class, then natural_key's order (a digit run compares by its value)."""
    import random

    rng = random.Random(7)
    chars = "ab-_. xZ~é日"
    names = set()
    while len(names) < 3000:
        a = "".join(rng.choice(chars) for _ in range(rng.randint(0, 3)))
        b = "".join(rng.choice(chars) for _ in range(rng.randint(0, 3)))
        # zero-padded twins ("03", "3") tie by value; 19 digits and more do not fit an int64
        n = rng.choice(["", "", "0", "00"]) + str(rng.randint(0, 10 ** rng.choice([1, 2, 3, 6, 12, longest])))
        extra = "" if one_number else rng.choice(["", f"{rng.randint(0, 99)}", "v2"])
        if not a.startswith("."):            # dotfiles are never data
            names.add(f"{a}{n}{b}{extra}.png")
    paths = [f"d/train/{c}/{name}" for name in sorted(names) for c in ("10", "9")]
    rng.shuffle(paths)
    lay = find_layout(paths + ["d/valid/9/x.png", "d/valid/10/y.png"])
    got = split_files(paths, lay, "train")
    assert len(got) == len(paths) and [c for _, c in got] == sorted(c for _, c in got)
    assert lay.classes == ["9", "10"]
    keys = [(c, natural_key(p.rsplit("/", 1)[1])) for p, c in got]
    assert keys == sorted(keys)


def test_the_layout_is_found_from_a_few_paths_the_same_as_from_all():
    """layout_paths keeps every file of a folder holding folders, one of every other folder."""
    import pyarrow as pa

    from pixelsim.storage.layout import layout_paths

    paths = [f"w/data/{split}/{c}/{i}.png" for split in ("train", "valid") for c in ("3", "7", "10")
             for i in range(50)]
    paths += ["w/data/train/labels.csv", "w/data/README", "w/data/test/x.png", "w/.hidden/a.png",
              "w/data/train/8/.DS_Store", "w/data/extra/4/a.png", "top.txt"]
    few = layout_paths(pa.table({"path": paths}))
    assert len(few) < 20 and "w/data/train/labels.csv" in few and "w/data/README" in few
    assert not any("/." in p for p in few) and "w/data/train/8/.DS_Store" not in few
    assert find_layout(few) == find_layout(paths)
    assert find_layout(few, classes=["3", "10"]) == find_layout(paths, classes=["3", "10"])
