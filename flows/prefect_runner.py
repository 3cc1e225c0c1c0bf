"""The Prefect runner: every step a task run, retried on transient errors, shown `Cached` when the
storage root already held its output; and the choice of task runner for the mapped steps.

Prefect's own result cache is not used: whether a step is skipped is decided from the root
(`pixelsim.storage.cache`), so a fresh `PREFECT_HOME`, another host or a worker reuses it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Completed, State
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from prefect.tasks import Task, exponential_backoff

from pixelsim.flows.runners import RETRIES, RETRY_DELAY_S, Runner, is_transient, said
from pixelsim.storage.cache import Outcome

RUNNERS = ("thread", "process", "dask")
_tasks: dict[Callable, Task] = {}
_heartbeat_s: int | None = None   # set by `prompt_heartbeats`: the flow body sends them


@contextlib.contextmanager
def prompt_heartbeats() -> Iterator[int | None]:
    """Prefect's engine joins its flow-heartbeat thread at the end of every run, and that thread
    sleeps in whole seconds: 0.5-1 s of each run spent waiting. Within this block the engine's
    heartbeats are off and `heartbeats()` in the flow body sends the same events, at the same
    interval, from a thread that stops at once. Crashed-run detection reads these events."""
    global _heartbeat_s
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    _heartbeat_s = get_current_settings().flows.heartbeat_frequency
    try:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield _heartbeat_s
    finally:
        _heartbeat_s = None


@contextlib.contextmanager
def heartbeats() -> Iterator[None]:
    """`prefect.flow-run.heartbeat` events for the running flow run every `_heartbeat_s`
    seconds, as the engine sends them, when `prompt_heartbeats` turned the engine's off."""
    import prefect
    from prefect.context import FlowRunContext
    from prefect.events import emit_event

    seconds, ctx = _heartbeat_s, FlowRunContext.get()
    if seconds is None or ctx is None or ctx.flow_run is None:
        yield
        return
    run = ctx.flow_run
    resource = {"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.name": run.name or "",
                "prefect.version": prefect.__version__}
    related = [{"prefect.resource.id": f"prefect.flow.{run.flow_id}", "prefect.resource.role": "flow",
                "prefect.resource.name": ctx.flow.name if ctx.flow else ""}]
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):   # a lost heartbeat is not the run's failure
                emit_event(event="prefect.flow-run.heartbeat", resource=resource, related=related)
            if stop.wait(seconds):
                return

    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True,
                              name="pixelsim-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(1)


def _retry(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - only asked whether to retry
        return is_transient(e)
    return False


def as_task(name: str, fn: Callable[..., Outcome]) -> Task:
    """The thin @task around a plain step function: a reused output ends the run as `Cached`."""
    if fn not in _tasks:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            get_run_logger().info(said(out))
            return Completed(name="Cached", message="reused from the storage root", data=out) if out.cached else out

        _tasks[fn] = task(run, name=name, cache_policy=NO_CACHE, persist_result=False, retries=RETRIES,
                          retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_DELAY_S),
                          retry_jitter_factor=0.5, retry_condition_fn=_retry)
    return _tasks[fn]


def _outcome(value: Any) -> Any:
    """A task that returned a Cached state hands that state to its caller: its data is the Outcome."""
    return value.result() if isinstance(value, State) else value


class PrefectRunner(Runner):
    """Runs inside a flow run: single steps in the flow's thread, mapped ones on its task runner."""

    def __init__(self, refresh: bool = False, progress: dict[str, Callable[[int, int], None]] | None = None):
        super().__init__(refresh, run_id=str(flow_run.id), log=get_run_logger())
        self.progress = progress or {}

    def _call(self, name: str, fn: Callable[..., Outcome], args: tuple, kwargs: dict,
              retries: int = RETRIES) -> Outcome:
        state = as_task(name, fn).with_options(task_run_name=name, retries=retries)(*args, return_state=True, **kwargs)
        return _outcome(state.result())

    def _map(self, name: str, fn: Callable[..., Outcome], jobs: Sequence[Any]) -> list[Outcome | BaseException]:
        t = as_task(name, fn)
        futures = [t.with_options(task_run_name=j.name).submit(j, refresh=self.refresh) for j in jobs]
        if on_done := self.progress.get(name):
            on_done(0, len(futures), False)
            for n, future in enumerate(as_completed(futures), 1):
                got = _outcome(future.result(raise_on_failure=False))
                on_done(n, len(futures), not getattr(got, "cached", False))
        outs: list[Outcome | BaseException] = []
        for future in futures:
            future.wait()
            state = future.state
            got = _outcome(state.result(raise_on_failure=False))
            outs.append(got if state.is_completed() or isinstance(got, BaseException)
                        else RuntimeError(f"{name}: task run ended {state.name}: {state.message}"))
        return outs


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
