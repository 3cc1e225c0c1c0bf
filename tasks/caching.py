"""How every step caches and retries.

Keys come from the step's name, its explicit code version and its arguments, which are
content digests of upstream outputs plus parameters: never a path alone. The flow checks
a cache hit's files (`storage.root.verify_output`) and recomputes when they are gone.
"""
from __future__ import annotations

from typing import Any

import os
from pathlib import Path

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.settings import PREFECT_HOME
from prefect.tasks import exponential_backoff

from storage.errors import PixelsimError, TransientError
from storage.locks import ExpiringLockManager
from storage.root import digest_json


def content_key(context: Any, parameters: dict[str, Any]) -> str:
    t = context.task
    return f"pixelsim-{t.name}-v{t.version}-{digest_json(parameters)}"


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry storage hiccups and transient errors; never a permanent one (bad input)."""
    try:
        state.result()
    except TransientError:
        return True
    except PixelsimError:
        return False
    except (OSError, TimeoutError):
        return True
    except Exception:
        return False
    return False


def lock_dir() -> Path:
    return Path(os.environ.get("PIXELSIM_LOCK_DIR") or PREFECT_HOME.value() / "pixelsim-locks")


def step(name: str, version: str, **options: Any):
    """The @task every pixelsim step uses: content-keyed cache, JSON results, bounded retries.

    SERIALIZABLE isolation makes concurrent runs with the same key wait for the first one
    and then read its result, so each piece of work is done once.
    """
    policy = CacheKeyFnPolicy(cache_key_fn=content_key).configure(
        isolation_level="SERIALIZABLE", lock_manager=ExpiringLockManager(lock_dir()))
    return task(name=name, version=version, cache_policy=policy, persist_result=True,
                result_serializer="json", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=1),
                retry_jitter_factor=0.5, retry_condition_fn=is_transient, **options)
