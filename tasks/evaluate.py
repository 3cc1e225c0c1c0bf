"""Step 5: classify every validation image by its nearest template, by L1 and by RMSE."""
from __future__ import annotations

import json
import posixpath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from storage.artifacts import TEMPLATES, read_templates, write_predictions
from storage.root import Root, digest_json, part_of, publish_parts, sha256_bytes, sha256_file
from storage.shards import iter_arrays
from tasks.caching import step
from tasks.templates import block_rows, torch_device

if TYPE_CHECKING:  # torch is imported where it is used: 2 s that a fully cached run never pays
    import torch

VERSION = "3"
METRICS = ("l1", "rmse")


def distances(x: torch.Tensor, templates: torch.Tensor, metric: str) -> torch.Tensor:
    """(n, classes) distances of float images in [0, 1] to each template.

    L1 is the seed's `mnist_distance`, the mean absolute difference; RMSE the root of
    the mean squared difference.
    """
    return image_distances(x, templates, (metric,))[metric]


def image_distances(images: torch.Tensor, templates: torch.Tensor,
                    metrics: tuple[str, ...] = METRICS) -> dict[str, torch.Tensor]:
    """{metric: (n, classes) distances} of images (uint8 pixels, or floats in [0, 1]) to templates.

    Rows go in cache-sized blocks through preallocated buffers, one class at a time, and one
    difference feeds both metrics, in place: |d| then |d| * |d|, which is d * d exactly. Each
    row is still reduced alone by the same ops as `(x - t).abs().mean(1)` over the whole
    shard, so every distance is bit-identical to that (tests/test_evaluate.py checks it).
    """
    import torch

    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}: use one of {', '.join(METRICS)}")
    dev = templates.device
    raw = images.dtype == torch.uint8
    dtype = torch.promote_types(torch.float32 if raw else images.dtype, templates.dtype)
    n, width = images.shape
    out = {m: torch.empty((n, len(templates)), dtype=dtype, device=dev) for m in metrics}
    blocks = row_blocks(n, block_rows(width, dtype.itemsize, dev, n))
    size = max((e - s for s, e in blocks), default=0)
    diff_buf = torch.empty((size, width), dtype=dtype, device=dev)
    x_buf = torch.empty((size, width), dtype=dtype, device=dev) if raw else None
    for s, e in blocks:
        x = images[s:e].to(dev)
        if raw:     # the seed's `x.float() / 255`, block by block
            x = x_buf[:e - s].copy_(x).div_(255.0)
        diff = diff_buf[:e - s]
        for c, t in enumerate(templates):
            torch.sub(x, t, out=diff)
            if "l1" in out:
                out["l1"][s:e, c] = diff.abs_().mean(dim=1)
            if "rmse" in out:
                out["rmse"][s:e, c] = diff.mul_(diff).mean(dim=1).sqrt()
    return out


def row_blocks(n: int, rows: int) -> list[tuple[int, int]]:
    """[start, end) blocks of `rows` rows; a last block of one row joins the one before.

    torch may split a lone row's reduction across threads (a one-output reduction), which
    can change its last bit, so a block has two rows or more unless the shard has one.
    """
    starts = list(range(0, n, rows))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n]))


def accuracy(confusion: np.ndarray) -> dict:
    """Per-class accuracy, their mean ("balanced"), overall accuracy, from a confusion matrix."""
    confusion = np.asarray(confusion, dtype=np.int64)
    totals = confusion.sum(axis=1)
    present = totals > 0
    per_class = np.diag(confusion)[present] / totals[present]
    by_class: list[float | None] = [None] * len(confusion)
    for i, acc in zip(np.flatnonzero(present), per_class):
        by_class[i] = float(acc)
    return {"per_class": by_class, "balanced": float(per_class.mean()),
            "overall": float(np.diag(confusion).sum() / max(confusion.sum(), 1)),
            "confusion": confusion.tolist()}


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return confusion


def evaluation_dir(shards: dict, templates: dict) -> str:
    return f"evaluations/{digest_json([shards['digest'], templates['digest'], VERSION])[:16]}"


def evaluate_shard(shard: str, sha256: str, templates: dict, out_dir: str, root: str, device: str = "cpu") -> dict:
    """Predict one validation shard by both distances; publish its predictions part file."""
    import torch

    dev = torch_device(device)
    r = Root(root)
    classes, means, _ = read_templates(r, posixpath.join(templates["dir"], TEMPLATES))
    t = torch.from_numpy(np.array(means)).to(dev)
    (batch,) = iter_arrays(r, [shard], ("path", "label_index", "image"), sha256={shard: sha256})
    d = image_distances(torch.from_numpy(batch["image"]), t)
    labels = batch["label_index"].astype(np.int64)
    preds, best_d, confusion = [], [], {}
    for m in METRICS:
        best = d[m].argmin(dim=1)
        pred = best.cpu().numpy()
        confusion[m] = confusion_matrix(labels, pred, len(classes)).tolist()
        preds.append(pred)
        best_d.append(d[m].gather(1, best[:, None])[:, 0].cpu().numpy())
    # Arrow arrays straight from numpy (no Python object per row); the file is the same.
    k, names, paths = len(METRICS), pa.array(classes, pa.string()), pa.array(batch["path"], pa.string())
    cols = {"path": pa.concat_arrays([paths] * k),
            "label": names.take(np.tile(labels, k)),
            "metric": pa.array(METRICS, pa.string()).take(np.repeat(np.arange(k), len(labels))),
            "predicted": names.take(np.concatenate(preds)),
            "correct": np.concatenate([p == labels for p in preds]),
            "distance": np.concatenate(best_d),
            "distances": np.concatenate([d[m].cpu().numpy() for m in METRICS])}
    rel = f"{out_dir}/predictions-{posixpath.basename(shard).removesuffix('.parquet')}.parquet"
    with r.staged_file(part_of(rel)) as tmp:
        write_predictions(tmp, cols)
        digest, size = sha256_file(tmp)
    return {"root": root, "file": rel, "sha256": digest, "bytes": size, "confusion": confusion}


def finish_evaluation(out_dir: str, classes: list[str], results: list[dict], root: str) -> dict:
    """Sum the shards' confusion matrices into metrics; publish _metrics.json and the manifest."""
    r = Root(root)
    metrics = {m: accuracy(sum(np.array(x["confusion"][m]) for x in results)) for m in METRICS}
    body = json.dumps({"classes": classes, "metrics": metrics}, indent=2).encode()
    r.write_bytes_atomic(f"{out_dir}/_metrics.json", body)
    metrics_file = {"file": f"{out_dir}/_metrics.json", "bytes": len(body), "sha256": sha256_bytes(body)}
    digest = publish_parts(r, out_dir, [*results, metrics_file], classes=classes)
    return {"root": root, "dir": out_dir, "digest": digest, "classes": classes, "metrics": metrics,
            "predictions": f"{out_dir}/predictions-*.parquet"}


def evaluate_templates(shards: dict, templates: dict, root: str, device: str = "cpu") -> dict:
    """Every validation shard without Prefect (benchmarks, scripts)."""
    out_dir = evaluation_dir(shards, templates)
    results = [evaluate_shard(s, shards["sha256"][s], templates, out_dir, root, device)
               for s in shards["shards"]["valid"]]
    return finish_evaluation(out_dir, templates["classes"], results, root)


evaluate = step("evaluate", VERSION)(evaluate_shard)
