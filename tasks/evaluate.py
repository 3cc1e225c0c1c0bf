"""Step 5: classify every validation image by its nearest template, by L1 and by RMSE."""
from __future__ import annotations

import posixpath

import numpy as np
import torch

from storage.artifacts import PREDICTIONS, TEMPLATES, read_templates, write_predictions
from storage.root import Root, digest_json
from storage.shards import iter_arrays
from tasks.caching import step

VERSION = "1"
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


def accuracy(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> dict:
    """Per-class accuracy, their mean ("balanced"), overall accuracy and the confusion matrix."""
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    totals = confusion.sum(axis=1)
    present = totals > 0
    per_class = np.diag(confusion)[present] / totals[present]
    by_class: list[float | None] = [None] * n_classes
    for i, acc in zip(np.flatnonzero(present), per_class):
        by_class[i] = float(acc)
    return {"per_class": by_class, "balanced": float(per_class.mean()),
            "overall": float(np.diag(confusion).sum() / max(confusion.sum(), 1)),
            "confusion": confusion.tolist()}


def evaluate_templates(shards: dict, templates: dict, root: str, device: str = "cpu") -> dict:
    """Write evaluations/<key>/predictions.parquet and return the metrics for both distances."""
    r = Root(root)
    classes, means, _ = read_templates(r, posixpath.join(templates["dir"], TEMPLATES))
    t = torch.from_numpy(np.array(means)).to(device)
    cols: dict[str, list] = {k: [] for k in ("path", "label", "metric", "predicted", "correct", "distance",
                                            "distances")}
    labels_all: list[np.ndarray] = []
    preds: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    names = np.array(classes, dtype=object)
    for batch in iter_arrays(r, shards["shards"]["valid"], ("path", "label_index", "image")):
        x = torch.from_numpy(batch["image"]).to(device).float() / 255.0
        labels = batch["label_index"].astype(np.int64)
        labels_all.append(labels)
        for m in METRICS:
            d = distances(x, t, m)
            best = d.argmin(dim=1)
            pred = best.cpu().numpy()
            preds[m].append(pred)
            cols["path"] += batch["path"]
            cols["label"] += names[labels].tolist()
            cols["metric"] += [m] * len(labels)
            cols["predicted"] += names[pred].tolist()
            cols["correct"] += (pred == labels).tolist()
            cols["distance"].append(d.gather(1, best[:, None])[:, 0].cpu().numpy())
            cols["distances"].append(d.cpu().numpy())
    labels = np.concatenate(labels_all)
    metrics = {m: accuracy(labels, np.concatenate(preds[m]), len(classes)) for m in METRICS}
    cols["distance"] = np.concatenate(cols["distance"])
    cols["distances"] = np.concatenate(cols["distances"])
    rel = f"evaluations/{digest_json([shards['digest'], templates['digest'], VERSION])[:16]}"
    with r.publish_dir(rel) as st:
        write_predictions(st, cols)
        st.write_json("metrics.json", {"classes": classes, "metrics": metrics})
    return {"root": root, "dir": rel, "digest": st.digest, "classes": classes, "metrics": metrics,
            "predictions": f"{rel}/{PREDICTIONS}"}


evaluate = step("evaluate", VERSION)(evaluate_templates)
