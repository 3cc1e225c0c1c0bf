"""Step 5: classify every validation image by its nearest template, by L1 and by RMSE."""
from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pixelsim.storage import catalog
from pixelsim.storage.artifacts import MAX_MATRIX, TEMPLATES, cells, dense, read_templates, write_predictions
from pixelsim.storage.cache import Outcome, load_part, record_part, reuse_or_build
from pixelsim.storage.root import Root, part_of, publish_parts, sha256_bytes, sha256_file
from pixelsim.storage.shards import iter_arrays
from pixelsim.tasks.contracts import METRICS, EvalJob, EvalPlan, Evaluation, Part, ShardSet, Templates
from pixelsim.tasks.templates import block_rows, torch_device

if TYPE_CHECKING:  # torch is imported where it is used: 2 s that a fully cached run never pays
    import torch

VERSION = "5"   # 5: confusion kept as non-zero cells in parts, and beyond MAX_MATRIX classes


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


def plan_evaluation(shards: ShardSet, templates: Templates, device: str = "cpu") -> EvalPlan:
    """One job per validation shard, into a folder keyed by the shards and templates it compares."""
    rel = catalog.evaluation_dir(shards.dataset, catalog.step_key("evaluate", VERSION, shards.digest,
                                                                  templates.digest))
    jobs = tuple(EvalJob(root=shards.root, dir=rel, name=f"evaluate-{i:05d}", dataset=shards.dataset, shard=shard,
                         sha256=shards.sha256[shard], templates=templates, device=device)
                 for i, shard in enumerate(shards.shards["valid"]))
    return EvalPlan(dir=rel, jobs=jobs)


def evaluate_shard(job: EvalJob, refresh: bool = False) -> Outcome[Part]:
    """Predict one validation shard by both distances; publish its predictions part file."""
    r = Root(job.root)
    rel = catalog.predictions_file(job.dir, job.shard)

    def build() -> Part:
        import torch

        dev = torch_device(job.device)
        classes, means, _ = read_templates(r, posixpath.join(job.templates.dir, TEMPLATES))
        t = torch.from_numpy(np.array(means)).to(dev)
        (batch,) = iter_arrays(r, [job.shard], ("path", "label_index", "image"), sha256={job.shard: job.sha256})
        d = image_distances(torch.from_numpy(batch["image"]), t)
        labels = batch["label_index"].astype(np.int64)
        preds, best_d, confusion = [], [], {}
        for m in METRICS:
            best = d[m].argmin(dim=1)
            pred = best.cpu().numpy()
            confusion[m] = cells(confusion_matrix(labels, pred, len(classes)))
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
        with r.staged_file(part_of(rel)) as tmp:
            write_predictions(tmp, cols, scope={"dataset": job.dataset, "key": catalog.key_of(job.dir)})
            digest, size = sha256_file(tmp)
        part = Part(file=rel, sha256=digest, bytes=size, split="valid", rows=len(labels), confusion=confusion)
        record_part(r, rel, part.to_dict())
        return part

    return reuse_or_build(r, rel, lambda: Part.from_dict(load_part(r, rel)), build, refresh=refresh)


def finish_evaluation(plan: EvalPlan, templates: Templates, parts: list[Part]) -> Evaluation:
    """Sum the shards' confusion matrices into metrics; publish _metrics.json and the manifest."""
    r, classes = Root(templates.root), list(templates.classes)
    matrices = {m: dense([c for x in parts for c in x.confusion[m]], len(classes)) for m in METRICS}
    metrics = {m: accuracy(matrix) for m, matrix in matrices.items()}
    if len(classes) > MAX_MATRIX:   # the records grow with the images, not the square of the classes
        metrics = {m: {**{k: v for k, v in a.items() if k != "confusion"}, "cells": cells(matrices[m])}
                   for m, a in metrics.items()}
    body = json.dumps({"classes": classes, "metrics": metrics}, indent=2).encode()
    metrics_rel = catalog.metrics_file(plan.dir)
    r.write_bytes_atomic(metrics_rel, body)
    metrics_file = {"file": metrics_rel, "bytes": len(body), "sha256": sha256_bytes(body)}
    out = Evaluation(root=templates.root, dir=plan.dir, digest="", dataset=templates.dataset, classes=classes,
                     metrics=metrics, predictions=catalog.predictions_glob(plan.dir),
                     parts={posixpath.basename(x.file): x.to_dict() for x in parts})
    digest = publish_parts(r, plan.dir, [*(x.to_dict() for x in parts), metrics_file], record=out.record(),
                           classes=classes)
    return dataclasses.replace(out, digest=digest)
