"""Step locks that a killed run cannot keep.

Prefect's file locks never expire unless given a hold timeout, so a SIGKILLed holder
would make the next run wait forever. Each lock here names its host and process and
carries an expiry: a lock whose process is gone (same host) or whose time is up is broken.

Prefect creates a lock file empty and writes it a moment later, so a concurrent reader can
find it empty or half-written: such a file counts as held (by a holder still writing it),
and one left empty for longer than EMPTY_STALE_S (its holder died in between) is broken.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager

HOST = socket.gethostname()
EMPTY_STALE_S = 10.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ExpiringLockManager(FileSystemLockManager):
    def __init__(self, lock_files_directory: Path, hold_timeout: float = 3600.0):
        super().__init__(lock_files_directory=lock_files_directory)
        self.hold_timeout = hold_timeout

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        if not super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.hold_timeout):
            return False
        # record who holds it, so a waiter can tell a dead holder from a slow one
        info = self._locks[key]
        path = Path(info["path"])
        body = {"holder": holder, "expiration": str(info["expiration"]), "host": HOST, "pid": os.getpid()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, path)  # never empty or half-written to a reader
        return True

    def _get_lock_info(self, key: str, use_cache: bool = True):
        try:
            return super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # empty or half-written: see the module docstring
            path = self._lock_path_for_key(key)
            try:
                if time.time() - path.stat().st_mtime > EMPTY_STALE_S:
                    path.unlink(missing_ok=True)
                    return None
            except FileNotFoundError:
                return None
            return {"holder": None, "expiration": None, "path": path}

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._get_lock_info(key, use_cache=use_cache)
        if info is None:
            return False
        pid = info.get("pid")
        if info.get("host") == HOST and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache=use_cache)
