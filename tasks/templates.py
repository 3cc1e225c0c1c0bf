"""Step 4: the per-class mean image ("template"), streamed over the training shards."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from pixelsim.storage import catalog
from pixelsim.storage.artifacts import write_templates
from pixelsim.storage.cache import Outcome, reuse_or_build
from pixelsim.storage.errors import PixelsimError
from pixelsim.storage.root import Root
from pixelsim.storage.shards import iter_arrays
from pixelsim.tasks.contracts import ShardSet, Templates

if TYPE_CHECKING:  # torch is imported where it is used: 2 s that a fully cached run never pays
    import torch

VERSION = "5"   # 5: pictures of classes whose names differ only in case or Unicode form are not one file; 4: a class whose name cannot be a file name gets a picture
# Bytes of one float temporary on the CPU: a block of rows this size stays in cache while
# it is converted, subtracted and reduced (measured ~4x faster than whole shards at 28x28).
BLOCK_BYTES = 4 << 20


def torch_device(name: str) -> torch.device:
    """The torch device for `--device`, checked before any work so a bad one fails at once, saying why."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise PixelsimError(f"--device {name}: not a torch device ({e}); use --device cpu, "
                            "or cuda / cuda:N on a machine with an NVIDIA GPU") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PixelsimError(f"--device {name}: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                                "use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise PixelsimError(f"--device {name}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; "
                                "use one of those or --device cpu")
        return dev
    if dev.type in ("mps", "xpu"):
        probe = "backends.mps" if dev.type == "mps" else "xpu"
        available = torch.backends.mps.is_available() if dev.type == "mps" else torch.xpu.is_available()
        if not available:
            raise PixelsimError(f"--device {name}: torch sees no {dev.type} device "
                                f"(torch.{probe}.is_available() is False); use --device cpu")
        return dev
    raise PixelsimError(f"--device {name}: pixelsim does not compute on {dev.type!r} devices; "
                        "use --device cpu, or cuda / cuda:N on a machine with an NVIDIA GPU")


def block_rows(width: int, itemsize: int, device: torch.device, n: int) -> int:
    """Rows per block: cache-sized on the CPU, every row at once elsewhere (as before blocking)."""
    if device.type != "cpu":
        return max(n, 1)
    return max(2, BLOCK_BYTES // max(width * itemsize, 1))


def class_means(batches: Iterable[tuple[np.ndarray, np.ndarray]], n_classes: int,
                device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Mean of each class's images in [0, 1], as float32, from (labels, uint8 images) batches.

    Sums are float64 over integer pixels, so they are exact and independent of batch
    order and blocking; memory is one batch plus one block plus (classes x pixels).

    On the CPU torch gets one thread fewer than it would take: the batches are read, hashed and
    parsed on this thread meanwhile, and with every core given to torch its idle threads spin
    against the reader (on 2 cores the step's time then varied threefold from run to run;
    section G of the benchmark times it). The setting is put back afterwards.
    """
    import torch

    dev = torch_device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(max(1, threads - 1))
    try:
        return _class_means(batches, n_classes, dev)
    finally:
        torch.set_num_threads(threads)


def _class_means(batches: Iterable[tuple[np.ndarray, np.ndarray]], n_classes: int,
                 dev: torch.device) -> tuple[np.ndarray, np.ndarray]:
    import torch

    sums = counts = buf = None
    for labels, images in batches:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(dev)     # uint8 over the bus, not float64
        lab = torch.from_numpy(labels.astype(np.int64)).to(dev)
        if sums is None:
            sums = torch.zeros((n_classes, x.shape[1]), dtype=torch.float64, device=dev)
            counts = torch.zeros(n_classes, dtype=torch.float64, device=dev)
        rows = block_rows(x.shape[1], 8, dev, len(x))
        if buf is None or len(buf) < min(rows, len(x)):
            buf = torch.empty((min(rows, len(x)), x.shape[1]), dtype=torch.float64, device=dev)
        for s in range(0, len(x), rows):
            part = x[s:s + rows]
            sums.index_add_(0, lab[s:s + rows], buf[:len(part)].copy_(part))
        counts.index_add_(0, lab, torch.ones_like(lab, dtype=torch.float64))
    if sums is None:
        raise ValueError("no training images")
    means = sums / counts.clamp(min=1)[:, None] / 255.0
    return means.float().cpu().numpy(), counts.cpu().numpy().astype(np.int64)


def compute_templates(shards: ShardSet, device: str = "cpu", refresh: bool = False) -> Outcome[Templates]:
    """Write templates/<dataset>/<key>/templates.parquet and a picture per class (catalog.template_images)."""
    r = Root(shards.root)
    rel = catalog.templates_dir(shards.dataset, catalog.step_key("templates", VERSION, shards.digest))

    def build() -> Templates:
        batches = ((b["label_index"], b["image"]) for b in iter_arrays(r, shards.shards["train"], sha256=shards.sha256))
        means, counts = class_means(batches, len(shards.classes), device)
        out = Templates(root=shards.root, dir=rel, digest="", dataset=shards.dataset, classes=list(shards.classes),
                        counts=dict(zip(shards.classes, counts.tolist())))
        with r.publish_dir(rel) as st:
            write_templates(st, shards.classes, counts.tolist(), means, tuple(shards.shape),
                            scope={"dataset": shards.dataset, "key": out.key})
            st.meta.update(record=out.record(), shape=shards.shape, shards_digest=shards.digest)
        return dataclasses.replace(out, digest=st.digest)

    return reuse_or_build(r, rel, lambda: Templates.load(shards.root, rel), build, refresh=refresh)
