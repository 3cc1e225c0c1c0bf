"""Step 4: the per-class mean image ("template"), streamed over the training shards."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from storage.artifacts import write_templates
from storage.root import Root, digest_json
from storage.shards import iter_arrays
from tasks.caching import step

VERSION = "2"


def class_means(batches: Iterable[tuple[np.ndarray, np.ndarray]], n_classes: int,
                device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Mean of each class's images in [0, 1], as float32, from (labels, uint8 images) batches.

    Sums are float64 over integer pixels, so they are exact and independent of batch
    order; memory is one batch plus (classes x pixels).
    """
    sums = counts = None
    for labels, images in batches:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        lab = torch.from_numpy(labels.astype(np.int64)).to(device)
        if sums is None:
            sums = torch.zeros((n_classes, x.shape[1]), dtype=torch.float64, device=device)
            counts = torch.zeros(n_classes, dtype=torch.float64, device=device)
        sums.index_add_(0, lab, x.to(torch.float64))
        counts.index_add_(0, lab, torch.ones_like(lab, dtype=torch.float64))
    if sums is None:
        raise ValueError("no training images")
    means = sums / counts.clamp(min=1)[:, None] / 255.0
    return means.float().cpu().numpy(), counts.cpu().numpy().astype(np.int64)


def compute_templates(shards: dict, root: str, device: str = "cpu") -> dict:
    """Write templates/<key>/templates.parquet and <class>.png."""
    r = Root(root)
    batches = ((b["label_index"], b["image"]) for b in iter_arrays(r, shards["shards"]["train"], sha256=shards["sha256"]))
    means, counts = class_means(batches, len(shards["classes"]), device)
    rel = f"templates/{digest_json([shards['digest'], VERSION])[:16]}"
    with r.publish_dir(rel) as st:
        write_templates(st, shards["classes"], counts.tolist(), means, tuple(shards["shape"]))
        st.meta.update(classes=shards["classes"], shape=shards["shape"], shards_digest=shards["digest"])
    return {"root": root, "dir": rel, "digest": st.digest, "classes": shards["classes"],
            "counts": dict(zip(shards["classes"], counts.tolist()))}


templates = step("templates", VERSION)(compute_templates)
