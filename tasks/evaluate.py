"""Step 5: classify every validation image by its nearest template, by L1 and by RMSE."""
from __future__ import annotations

import json
import posixpath

import numpy as np
import torch

from storage.artifacts import TEMPLATES, read_templates, write_predictions
from storage.root import Root, digest_json, part_of, publish_parts, sha256_bytes, sha256_file
from storage.shards import iter_arrays
from tasks.caching import step

VERSION = "3"
METRICS = ("l1", "rmse")


def distances(x: torch.Tensor, templates: torch.Tensor, metric: str) -> torch.Tensor:
    """(n, classes) distances of float images in [0, 1] to each template.

    L1 is the seed's `mnist_distance`, the mean absolute difference; RMSE the root of
    the mean squared difference. One class at a time keeps memory at n x pixels.
    """
    cols = []
    for t in templates:
        diff = x - t
        if metric == "l1":
            cols.append(diff.abs().mean(dim=1))
        elif metric == "rmse":
            cols.append((diff * diff).mean(dim=1).sqrt())
        else:
            raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    return torch.stack(cols, dim=1)


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
    r = Root(root)
    classes, means, _ = read_templates(r, posixpath.join(templates["dir"], TEMPLATES))
    t = torch.from_numpy(np.array(means)).to(device)
    (batch,) = iter_arrays(r, [shard], ("path", "label_index", "image"), sha256={shard: sha256})
    x = torch.from_numpy(batch["image"]).to(device).float() / 255.0
    labels = batch["label_index"].astype(np.int64)
    names = np.array(classes, dtype=object)
    cols: dict[str, list] = {k: [] for k in ("path", "label", "metric", "predicted", "correct", "distance",
                                            "distances")}
    confusion = {}
    for m in METRICS:
        d = distances(x, t, m)
        best = d.argmin(dim=1)
        pred = best.cpu().numpy()
        confusion[m] = confusion_matrix(labels, pred, len(classes)).tolist()
        cols["path"] += batch["path"]
        cols["label"] += names[labels].tolist()
        cols["metric"] += [m] * len(labels)
        cols["predicted"] += names[pred].tolist()
        cols["correct"] += (pred == labels).tolist()
        cols["distance"].append(d.gather(1, best[:, None])[:, 0].cpu().numpy())
        cols["distances"].append(d.cpu().numpy())
    cols["distance"] = np.concatenate(cols["distance"])
    cols["distances"] = np.concatenate(cols["distances"])
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
