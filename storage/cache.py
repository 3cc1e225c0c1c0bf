"""The cache is the storage root: a published folder whose manifest verifies is a step's result.

Any process that sees the root (another `PREFECT_HOME`, host, worker or container) reuses
it; nothing about it lives in Prefect's result storage.

Runs that reach the same output at once take a lock named by the output's path: one builds,
the others wait and then find the published folder. Lock files live in `<root>/_locks/` for a
local root (so every process that shares the disk shares them), else in `$PIXELSIM_LOCK_DIR`
or `$PREFECT_HOME/pixelsim-locks` on the machine running the step: several hosts on one
object-store root do not see each other's locks, so they may build the same output twice,
but each publishes identical bytes (outputs are deterministic and content-keyed) with the
manifest last, so a reader never sees a partial or mixed folder.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import posixpath
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from pixelsim.storage import env
from pixelsim.storage.errors import IntegrityError, NotPublished, PixelsimError
from pixelsim.storage.locks import ExpiringLockManager
from pixelsim.storage.root import Root, digest_json, part_of, part_record, seal_ok, sealed

T = TypeVar("T")
LOCKS = "_locks"
HOLD_S = 3600.0


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """A step's output; whether it came from the root (a cache hit) or was built now; and, when
    a published output was there but failed its check, why it was rebuilt."""

    value: T
    cached: bool
    rebuilt_because: str | None = None


def lock_dir(root: Root) -> Path:
    if folder := env.folder(env.LOCK_DIR):
        return folder
    if root.local:
        return Path(root.path(LOCKS))
    return prefect_home() / "pixelsim-locks"


def lock_manager(root: Root) -> ExpiringLockManager:
    """The step locks of `root`; only the root's own `_locks` may be repaired (a file in its
    place removed): any other lock folder is the user's, and nothing there is deleted."""
    where = lock_dir(root)
    own = root.local and where == Path(root.path(LOCKS))
    return ExpiringLockManager(where, hold_timeout=HOLD_S, repair=own)


def prefect_home() -> Path:
    """Where Prefect keeps this machine's state, read without importing Prefect."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")


def reuse_or_build(root: Root, rel: str, load: Callable[[], T], build: Callable[[], T], *,
                   refresh: bool = False) -> Outcome[T]:
    """`load()` the published output at `rel` if it verifies, else `build()` it under a lock.

    `load` raises NotPublished when there is no output yet, IntegrityError when it is damaged.
    After the lock is taken the root is looked at again: a concurrent run may have published
    the output meanwhile.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise PixelsimError("pixelsim was called while a new worker process was importing the main script; put "
                            "the script's pixelsim calls under `if __name__ == \"__main__\":`")
    invalid: list[str] = []

    def reuse(tell: bool) -> T | None:
        if refresh:
            return None
        try:
            return load()
        except IntegrityError as e:
            if tell and not isinstance(e, NotPublished):
                invalid.append(str(e))
            return None

    found = reuse(True)
    if found is not None:
        return Outcome(found, True)
    locks = lock_manager(root)
    key = "pixelsim-" + digest_json([root.url, rel])[:32]
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    locks.acquire_lock(key, holder, acquire_timeout=None, hold_timeout=HOLD_S)
    try:
        found = reuse(False)
        if found is not None:
            return Outcome(found, True)
        return Outcome(build(), False, invalid[0] if invalid else None)
    finally:
        locks.release_lock(key, holder)


def load_part(root: Root, rel: str) -> dict:
    """The record of a file that a mapped task wrote for `rel`: from its folder's manifest once
    published, else from the record beside the part; only if the file still matches it."""
    folder, name = posixpath.split(rel)
    candidates, listed = [], False
    with contextlib.suppress(FileNotFoundError, ValueError, LookupError, TypeError, IntegrityError):
        record = root.manifest(folder)["record"]["parts"][name]
        candidates.append((rel, record))
        listed = True
    with contextlib.suppress(FileNotFoundError, ValueError, IsADirectoryError):
        beside = root.read_json(part_record(rel))
        if not seal_ok(beside) or not isinstance(beside.get("record"), dict):
            raise IntegrityError(f"{root.uri(part_record(rel))}: altered (its digest does not match its content)")
        candidates += [(part_of(rel), beside["record"]), (rel, beside["record"])]
    for path, record in candidates:
        if record.get("file", rel) != rel:   # another output's folder copied or moved here
            raise IntegrityError(f"{root.uri(rel)}: its record is that of {record.get('file')}")
        try:
            found = root.sha256(path)
        except FileNotFoundError:
            continue
        except IsADirectoryError:   # a file turned into a folder: damage, rebuilt
            raise IntegrityError(f"{root.uri(path)}: is a folder, not the file its record names") from None
        if found == (record.get("sha256"), record.get("bytes")):
            return record
        raise IntegrityError(f"{root.uri(rel)}: does not match its record (altered or truncated)")
    if listed:
        raise IntegrityError(f"{root.uri(rel)}: listed in its folder's manifest but missing")
    raise NotPublished(f"{root.uri(rel)}: not built yet")


def record_part(root: Root, rel: str, record: dict) -> None:
    """Write the record of a part a mapped task has just published (the part itself first)."""
    root.write_bytes_atomic(part_record(rel), json.dumps(sealed({"record": record}), separators=(",", ":")).encode())
