"""Task runners for the mapped steps: threads, a local process pool, or a Dask cluster."""
from __future__ import annotations

import os
from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

RUNNERS = ("thread", "process", "dask")


def task_runner(kind: str, workers: int | None = None, dask_address: str | None = None) -> Any:
    """`dask` without an address starts a local cluster bound to 127.0.0.1 only."""
    workers = workers or os.cpu_count() or 1
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "process":
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise SystemExit("pixelsim: --task-runner dask needs the extra: pip install 'pixelsim[dask]'") from None
        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "host": "127.0.0.1", "dashboard_address": None})
    raise ValueError(f"unknown task runner {kind!r}: use one of {', '.join(RUNNERS)}")
