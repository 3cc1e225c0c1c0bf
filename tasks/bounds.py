"""The memory a run may use follows from its options, the image shape and the number of
members (which the archive caps bound), never from how large the images are: shards are cut
by pixel bytes as well as by count, and the peak-memory formula below is checked once the
shape is known, before any image is decoded.

With w = bytes of one image (H x W x channels), k = classes, s = images per shard,
p = shard-building processes and m = members of the unpacked archive (at most its cap,
storage.archive.Caps.max_members):
    plan       PLAN x m                (the flow process: the index and its sort, in Arrow)
    convert    p x 3 x s x w           (decoded images, their stack, Parquet's buffers)
    templates  2 x s x w + 24 x k x w  (a shard read and unpacked; float64 sums and means)
    evaluate   2 x s x w + 8 x k x w   (a shard; the float32 templates, read and in use)
plus a fixed BASE for the interpreter, torch and pyarrow. The plan's memory is added to
every step's, since the flow's process keeps its pages while the steps run. Cache-sized blocks and buffers
(tasks/templates.py, tasks/evaluate.py) add at most 16 x w.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pixelsim.storage import env
from pixelsim.storage.errors import OptionError

SHARD_BYTES_ENV = "PIXELSIM_SHARD_BYTES"
SHARD_BYTES = 256 << 20          # pixel bytes per shard, at most (one image always fits)
MAX_MEMORY_ENV = "PIXELSIM_MAX_MEMORY"
BASE = 512 << 20                 # the interpreter, torch and pyarrow
PLAN = 400                       # bytes per member while convert plans (bench: convert's peak RSS from 100k to 1M, ~165)


def shard_bytes() -> int:
    return env.whole(SHARD_BYTES_ENV, SHARD_BYTES, 1)


def max_memory() -> int:
    return env.whole(MAX_MEMORY_ENV, default_max_memory(), 1)


def default_max_memory() -> int:
    """Half of this machine's memory: room for the page cache and whatever else runs."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@dataclass(frozen=True)
class Bounds:
    shard_images: int        # images per shard: --shard-size, or fewer where the images are large
    peak_bytes: int          # the formula's peak for this run
    limit_bytes: int


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def plan_bounds(shape: tuple[int, ...], classes: int, shard_size: int, processes: int, members: int = 0) -> Bounds:
    """Images per shard and the run's peak memory by the formula; OptionError naming the options
    to change when the peak is over $PIXELSIM_MAX_MEMORY (default: half this machine's memory)."""
    w = 1
    for side in shape:
        w *= int(side)
    s = max(1, min(shard_size, shard_bytes() // max(w, 1)))
    shard = s * w
    steps = {"convert": max(processes, 1) * 3 * shard, "templates": 2 * shard + 24 * classes * w,
             "evaluate": 2 * shard + 8 * classes * w}
    step, need = max(steps.items(), key=lambda kv: kv[1])
    peak = BASE + PLAN * members + need + 16 * w
    limit = max_memory()
    if peak > limit:
        size = "x".join(map(str, shape))
        raise OptionError(
            f"images of {size} ({w:,} bytes each) with {classes} classes"
            + (f" in an archive of {members:,} members" if members else "") + f" need about {gib(peak)} of memory "
            f"(the {step} step; see pixelsim.tasks.bounds), over the limit of {gib(limit)} "
            f"({MAX_MEMORY_ENV}; default half this machine's memory): pass a smaller --resize, fewer --classes "
            f"or --channels 1, or raise {MAX_MEMORY_ENV}")
    return Bounds(shard_images=s, peak_bytes=peak, limit_bytes=limit)
