"""A process pool for building shards, shared by the convert tasks of one process.

The thread task runner keeps Prefect in one process, where decoding holds the GIL; this pool
spreads whole shards (reads, checks, decoding, Parquet) over every core without starting
Prefect (or torch) in the workers.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
import threading
from concurrent.futures import Executor, ProcessPoolExecutor

from pixelsim.storage import env

ENV = "PIXELSIM_DECODE_WORKERS"
_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


def workers() -> int:
    """Pool size: $PIXELSIM_DECODE_WORKERS, else the usable cores; 0 (decode in place) on one core
    or inside a worker of a process or Dask task runner, which already spreads the work."""
    if os.environ.get(ENV, "").strip():
        return env.whole(ENV, 0, 0)
    if multiprocessing.parent_process() is not None or not _main_importable():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if cores > 1 else 0


def _main_importable() -> bool:
    """Workers re-import the main module; a script read from stdin has no file to import."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return getattr(getattr(main, "__spec__", None), "name", None) is not None or path is None or os.path.exists(path)


def pool() -> Executor | None:
    """The shared pool, started on first use; None when decoding should stay in this process."""
    global _pool
    with _lock:
        if _pool is None and (n := workers()):
            # forkserver: no fork of a process running Prefect's threads; workers preload only
            # storage (numpy, pyarrow, Pillow, pyspng), about 0.5 s once.
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["pixelsim.storage.shards"])
            _pool = ProcessPoolExecutor(n, mp_context=ctx)
        return _pool


def discard(broken: Executor) -> None:
    """Forget a pool whose worker died, so the next call starts a new one."""
    global _pool
    with _lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


def shutdown() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(cancel_futures=True)
            _pool = None


atexit.register(shutdown)
