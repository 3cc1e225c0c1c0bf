"""A process pool for building shards, shared by the convert tasks of one process.

The thread task runner keeps Prefect in one process, where decoding holds the GIL; this pool
spreads whole shards (reads, checks, decoding, Parquet) over every core without starting
Prefect (or torch) in the workers.
"""
from __future__ import annotations

import ast
import atexit
import functools
import logging
import multiprocessing
import os
import sys
import threading
from concurrent.futures import Executor, ProcessPoolExecutor

from pixelsim.storage import env
from pixelsim.storage.errors import shown

ENV = "PIXELSIM_DECODE_WORKERS"
_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
log = logging.getLogger("pixelsim.convert")


def workers() -> int:
    """Pool size: $PIXELSIM_DECODE_WORKERS, else the usable cores; 0 (decode in place) on one core,
    inside a worker of a process or Dask task runner, which already spreads the work, or when
    pool workers would run the main script again (see `_main_safe`)."""
    if os.environ.get(ENV, "").strip():
        n = env.whole(ENV, 0, 0)
    elif multiprocessing.parent_process() is not None:
        return 0
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = cores if cores > 1 else 0
    return n if n and _main_safe() else 0


def _main_safe() -> bool:
    """Whether pool workers can start without harm. Each one imports the main module the way
    multiprocessing does: a script (`python job.py`, `python -m job`) is run again, so a script
    that calls pixelsim outside an `if __name__ == "__main__":` block would start the run again in
    every worker, which then waits for the locks its parent holds (a hang); such a run decodes in
    place instead, with a warning. A script read from stdin has no file to import."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if name is not None:
        if name == "__main__" or name.endswith(".__main__"):   # never re-run (python -m pkg)
            return True
        path = getattr(spec, "origin", None)
    else:
        path = getattr(main, "__file__", None)
        if path is None:   # interactive, -c, a notebook: nothing to re-run
            return True
    if not path or not os.path.isfile(path):
        return False
    if _guarded(os.path.realpath(path)):
        return True
    _warn_once(path)
    return False


@functools.lru_cache(maxsize=8)
def _guarded(path: str) -> bool:
    """The script has an `if __name__ == "__main__":` block at its top level."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(1 << 22))
    except (OSError, SyntaxError, ValueError):
        return False
    names = {"__name__", "__main__"}
    return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
               and isinstance(node.test.ops[0], ast.Eq)
               and {getattr(x, "id", getattr(x, "value", None)) for x in (node.test.left, *node.test.comparators)}
               == names for node in tree.body)


@functools.lru_cache(maxsize=8)
def _warn_once(path: str) -> None:
    log.warning("decoding on one core: %s calls pixelsim outside an `if __name__ == \"__main__\":` block, so "
                "every pool worker would run the script again; put the calls under such a block to use every core",
                shown(path))


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


def warm() -> None:
    """Start the pool's workers now, in the background (their imports take about 0.5 s), so that
    they boot on the other cores while the flow's process is still planning."""
    if (ex := pool()) is not None:
        for _ in range(workers()):
            ex.submit(int)


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
