"""How the pipeline's steps are run: the bookkeeping every runner shares, and the plain runner.

The pipeline (`pixelsim.flows.pipeline`) calls `runner.step(name, fn, ...)` for a single step
and `runner.map(name, fn, jobs)` for a mapped one; a runner decides where the plain step
functions run. `PlainRunner` calls them in this process, with no Prefect (tests, the
benchmark, notebooks, `pixelsim.run`); `pixelsim.flows.prefect_runner.PrefectRunner` runs
each as a Prefect task run. Either way the cache is the storage root.
"""
from __future__ import annotations

import errno
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pixelsim.storage.cache import Outcome
from pixelsim.storage.errors import PixelsimError, TransientError, shown
from pixelsim.tasks.convert import BadImages

RETRIES = 2          # further attempts after a transient failure (a step's own retries come first)
RETRY_DELAY_S = 1.0  # doubled on each retry, with jitter


# OS errors that no retry can mend: a missing file, no permission, a read-only or full disk
PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                    errno.EFBIG, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL}


def is_transient(error: BaseException) -> bool:
    """Retry storage hiccups and transient errors; never a permanent one (bad input, a missing
    file, no permission, a read-only or full disk)."""
    if isinstance(error, TransientError):
        return True
    if isinstance(error, PixelsimError):
        return False
    if isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS:
        return False
    return isinstance(error, (OSError, TimeoutError))


def said(out: Outcome) -> str:
    """What a step did, for its log: built or reused, where, and what the output holds."""
    value = out.value
    where = getattr(value, "dir", None) if hasattr(value, "uri") else getattr(value, "file", "")
    verb = "reused from the storage root" if out.cached else "built"
    return shown(f"{verb}: {where}: {value.describe()}")   # class names come from the data


def gathered(name: str, outcomes: Sequence[Outcome | BaseException]) -> list[Outcome]:
    """The outcomes of a mapped step, or its failure: bad images of every job are reported together."""
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        bad = [e for f in failures if isinstance(f, BadImages) for e in f.errors]
        if bad:
            raise BadImages(bad)
        raise failures[0]
    return list(outcomes)  # type: ignore[arg-type]


class Runner:
    """Records, per step, whether every piece of it came from the root and how long it took."""

    def __init__(self, refresh: bool = False, run_id: str | None = None,
                 log: logging.Logger | logging.LoggerAdapter | None = None):
        self.refresh = refresh
        self.run_id = run_id or str(uuid.uuid4())
        self.log = log or logging.getLogger("pixelsim")
        self.cached: dict[str, bool] = {}
        self.seconds: dict[str, float] = {}

    def step(self, name: str, fn: Callable[..., Outcome], *args: Any, retries: int = RETRIES, **kwargs: Any) -> Any:
        """`retries=0` when a failure has a fallback that should come at once."""
        start = time.perf_counter()
        out = self._call(name, fn, args, {"refresh": self.refresh, **kwargs}, retries)
        self._note(name, [name], [out], start)
        return out.value

    def map(self, name: str, fn: Callable[..., Outcome], jobs: Sequence[Any]) -> list[Any]:
        """One call of `fn` per job (each job has a `.name`), concurrently where the runner can."""
        start = time.perf_counter()
        outs = gathered(name, self._map(name, fn, jobs))
        self._note(name, [j.name for j in jobs], outs, start)
        return [o.value for o in outs]

    def _note(self, step: str, names: list[str], outs: list[Outcome], start: float) -> None:
        for n, o in zip(names, outs):
            if o.rebuilt_because:
                self.log.warning("%s: cached result no longer valid (%s); recomputing", n, o.rebuilt_because)
        self.cached[step] = all(o.cached for o in outs)
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start

    # -- what a runner implements ---------------------------------------------------------
    def _call(self, name: str, fn: Callable[..., Outcome], args: tuple, kwargs: dict,
              retries: int = RETRIES) -> Outcome:
        raise NotImplementedError

    def _map(self, name: str, fn: Callable[..., Outcome], jobs: Sequence[Any]) -> list[Outcome | BaseException]:
        raise NotImplementedError


class PlainRunner(Runner):
    """The steps as plain calls in this process, retried like Prefect retries them."""

    def _call(self, name: str, fn: Callable[..., Outcome], args: tuple, kwargs: dict,
              retries: int = RETRIES) -> Outcome:
        for attempt in range(retries + 1):
            try:
                out = fn(*args, **kwargs)
                self.log.info("%s %s", name, said(out))
                return out
            except Exception as e:  # noqa: BLE001 - retried or re-raised as it is
                if attempt == retries or not is_transient(e):
                    raise
                self.log.warning("%s failed (%s); retrying", name, e)
                time.sleep(RETRY_DELAY_S * 2 ** attempt * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _map(self, name: str, fn: Callable[..., Outcome], jobs: Sequence[Any]) -> list[Outcome | BaseException]:
        from pixelsim.tasks import pool

        def one(job: Any) -> Outcome | BaseException:
            try:
                return self._call(job.name, fn, (job,), {"refresh": self.refresh})
            except BadImages as e:
                return e

        # jobs on the shared process pool: a thread per pool worker keeps every worker busy;
        # without it threads would only contend for the GIL
        parallel = any(getattr(j, "parallel", False) for j in jobs)
        with ThreadPoolExecutor(max(1, pool.workers()) if parallel else 1) as threads:
            return list(threads.map(one, jobs))
