"""Blocked distances, the predictions file and --device checks, on the plain functions."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pixelsim.tasks.templates as templates_mod
from pixelsim.storage.errors import PixelsimError
from pixelsim.storage.root import Root
from pixelsim.storage.shards import ShardMeta, iter_arrays, write_shard
from pixelsim.storage.artifacts import dense
from pixelsim.tasks.contracts import EvalJob, ShardSet, Templates
from pixelsim.tasks.evaluate import METRICS, distances, evaluate_shard, image_distances, row_blocks
from pixelsim.tasks.templates import class_means, compute_templates, torch_device


def reference(x: torch.Tensor, t: torch.Tensor, metric: str) -> torch.Tensor:
    """The unblocked computation pixelsim had before: one class at a time over every row."""
    cols = []
    for c in t:
        diff = x - c
        cols.append(diff.abs().mean(dim=1) if metric == "l1" else (diff * diff).mean(dim=1).sqrt())
    return torch.stack(cols, dim=1)


def mnist_like(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    protos = (rng.random((classes, 784)) > 0.75) * rng.integers(100, 256, (classes, 784))
    images = np.clip(protos[labels] + rng.normal(0, 60, (n, 784)), 0, 255)
    images[images < 40] = 0
    return labels, images.astype(np.uint8)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 7 rows of 28x28 float32, so a few hundred images make many blocks and a ragged end."""
    monkeypatch.setattr(templates_mod, "BLOCK_BYTES", 7 * 784 * 4)


@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_distances_equal_the_unblocked_reference_bit_for_bit(small_blocks, threads):
    labels, images = mnist_like(1003, 10)              # 1003 = 143 blocks of 7 + 2 rows
    t = torch.from_numpy(np.random.default_rng(1).random((10, 784), dtype=np.float32))
    x = torch.from_numpy(images).float() / 255.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        blocked = image_distances(torch.from_numpy(images), t)
        for m in METRICS:
            ref = reference(x, t, m)
            assert torch.equal(blocked[m], ref), m
            assert torch.equal(distances(x, t, m), ref), m
            # the seed script's formulation over (n, 28, 28)
            seed = torch.stack([(x.view(-1, 28, 28) - c.view(28, 28)).abs().mean((-1, -2)) if m == "l1" else
                                ((x.view(-1, 28, 28) - c.view(28, 28)) ** 2).mean((-1, -2)).sqrt() for c in t], 1)
            assert torch.equal(blocked[m], seed), m
    finally:
        torch.set_num_threads(before)


def test_row_blocks_cover_every_row_and_never_leave_one_alone():
    for n in range(0, 40):
        for rows in (2, 3, 7, 64):
            blocks = row_blocks(n, rows)
            assert [i for s, e in blocks for i in range(s, e)] == list(range(n))
            assert all(e - s >= 2 for s, e in blocks) or n == 1
            assert all(e - s <= rows + 1 for s, e in blocks)


def test_large_images_in_small_blocks_still_match_with_two_threads(monkeypatch):
    """A lone row of 200,000 pixels is summed in two halves by two threads, so no block may be one row."""
    monkeypatch.setattr(templates_mod, "BLOCK_BYTES", 2 * 200_000 * 4)     # 2 rows a block, 5 rows
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 200_000), dtype=torch.uint8, generator=gen)
    t = torch.rand((2, 200_000), generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = image_distances(images, t)
        for m in METRICS:
            assert torch.equal(got[m], reference(images.float() / 255.0, t, m)), m
    finally:
        torch.set_num_threads(before)


def test_blocked_class_means_equal_the_float64_sums_of_whole_batches(small_blocks):
    labels, images = mnist_like(1000, 3, seed=2)
    batches = [(labels[i:i + 333], images[i:i + 333]) for i in range(0, 1000, 333)]
    means, counts = class_means(batches, 3)
    sums = np.zeros((3, 784))
    for c in range(3):
        sums[c] = images[labels == c].astype(np.float64).sum(0)
    want = (sums / np.bincount(labels, minlength=3)[:, None] / 255.0).astype(np.float32)
    assert np.array_equal(means, want) and counts.tolist() == np.bincount(labels, minlength=3).tolist()


def old_predictions(classes, paths, labels, images, t) -> pa.Table:
    """The predictions table as evaluate_shard built it before (Python lists of strings)."""
    x = torch.from_numpy(images).float() / 255.0
    names = np.array(classes, dtype=object)
    cols = {k: [] for k in ("path", "label", "metric", "predicted", "correct", "distance", "distances")}
    for m in METRICS:
        d = reference(x, t, m)
        best = d.argmin(dim=1)
        pred = best.numpy()
        cols["path"] += paths
        cols["label"] += names[labels].tolist()
        cols["metric"] += [m] * len(labels)
        cols["predicted"] += names[pred].tolist()
        cols["correct"] += (pred == labels).tolist()
        cols["distance"].append(d.gather(1, best[:, None])[:, 0].numpy())
        cols["distances"].append(d.numpy())
    dist = np.concatenate(cols["distances"])
    return pa.table({
        "path": pa.array(cols["path"], pa.string()), "label": pa.array(cols["label"], pa.string()),
        "metric": pa.array(cols["metric"], pa.string()), "predicted": pa.array(cols["predicted"], pa.string()),
        "correct": pa.array(cols["correct"], pa.bool_()),
        "distance": pa.array(np.concatenate(cols["distance"]), pa.float32()),
        "distances": pa.FixedSizeListArray.from_arrays(pa.array(dist.ravel(), pa.float32()), dist.shape[1])})


@pytest.mark.parametrize("n_classes", [2, 4])
def test_predictions_file_reads_back_as_before(tmp_path, small_blocks, n_classes):
    classes = [f"c{i}" for i in range(n_classes)]
    root = str(tmp_path)
    files, digests = {}, {}
    for split, n, seed in (("train", 120, 3), ("valid", 101, 4)):
        labels, images = mnist_like(n, n_classes, seed)
        rel = f"shards/{split}-00000-of-00001.parquet"
        (tmp_path / "shards").mkdir(exist_ok=True)
        write_shard(str(tmp_path / rel), ShardMeta((28, 28), classes, split, "0" * 64),
                    [f"{split}/{classes[c]}/{i}.png" for i, c in enumerate(labels)], labels, images)
        files[split] = [rel]
        digests[rel] = hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()
    shards = ShardSet(root=root, dir="shards", digest="test", dataset="ds", classes=classes, shape=[28, 28],
                      shards=files, sha256=digests)
    tmpl = compute_templates(shards).value
    valid = shards.shards["valid"][0]
    job = EvalJob(root=root, dir="evaluations/ds/x", name="evaluate-00000", dataset="ds", shard=valid,
                  sha256=digests[valid], templates=tmpl)
    out = evaluate_shard(job).value
    (batch,) = iter_arrays(Root(root), [valid], ("path", "label_index", "image"))
    means = pq.read_table(tmp_path / tmpl.dir / "templates.parquet").column("template").combine_chunks()
    t = torch.from_numpy(means.values.to_numpy().reshape(n_classes, -1).copy())
    want = old_predictions(classes, batch["path"], batch["label_index"].astype(np.int64), batch["image"], t)

    found = list((tmp_path / "evaluations" / "ds" / "x").rglob("predictions-*.parquet"))
    assert len(found) == 1 and found[0].stat().st_size == out.bytes
    got = pq.read_table(found[0])
    # each row says which output it belongs to, so a glob over several folders can be told apart
    assert got.column_names[:2] == ["dataset", "key"]
    assert set(got.column("dataset").to_pylist()) == {"ds"} and set(got.column("key").to_pylist()) == {"x"}
    got = got.drop_columns(["dataset", "key"])
    assert got.schema == want.schema            # plain strings, not dictionaries: readers see no change
    df, ref = got.to_pandas(), want.to_pandas()
    pd.testing.assert_frame_equal(df.drop(columns="distances"), ref.drop(columns="distances"), check_exact=True)
    assert np.array_equal(np.stack(df["distances"]), np.stack(ref["distances"]))
    assert not isinstance(df["label"].dtype, pd.CategoricalDtype)
    assert df["metric"].tolist() == ["l1"] * 101 + ["rmse"] * 101
    assert dense(out.confusion["l1"], len(classes)).tolist() == pd.crosstab(ref.label[:101], ref.predicted[:101]).reindex(
        index=classes, columns=classes, fill_value=0).values.tolist()   # a part keeps the non-zero cells


def nowhere(tmp_path, device: str) -> EvalJob:
    """A job whose inputs do not even exist: the device is checked before anything is read."""
    tmpl = Templates(root=str(tmp_path), dir="nowhere", digest="x", dataset="ds", classes=["a", "b"])
    return EvalJob(root=str(tmp_path), dir="out", name="evaluate-00000", dataset="ds", shard="missing.parquet",
                   sha256="0" * 64, templates=tmpl, device=device)


def test_device_cpu_is_the_default_and_accepted():
    assert torch_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_fails_fast_with_the_fix(tmp_path):
    with pytest.raises(PixelsimError, match=r"--device cuda: torch sees no CUDA GPU \(torch.cuda.is_available\(\) "
                                            r"is False\); use --device cpu"):
        torch_device("cuda")
    # both steps check before they read anything (these inputs do not even exist)
    with pytest.raises(PixelsimError, match="--device cuda:1: torch sees no CUDA GPU"):
        evaluate_shard(nowhere(tmp_path, "cuda:1"))
    with pytest.raises(PixelsimError, match="--device cuda: torch sees no CUDA GPU"):
        class_means([], 3, device="cuda")


@pytest.mark.parametrize("name", ["tpu9", "", "CUDA", "meta"])
def test_unknown_device_names_fail_with_the_fix(tmp_path, name):
    with pytest.raises(PixelsimError, match=rf"^--device {name}: .*use --device cpu"):
        torch_device(name)
    with pytest.raises(PixelsimError, match=rf"^--device {name}: "):
        class_means([], 3, device=name)
    with pytest.raises(PixelsimError, match=rf"^--device {name}: "):
        evaluate_shard(nowhere(tmp_path, name))
