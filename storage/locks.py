"""Step locks that a killed run cannot keep.

Prefect's file locks never expire unless given a hold timeout, so a SIGKILLed holder
would make the next run wait forever. Each lock here names its host and process and
carries an expiry: a lock whose process is gone (same host) or whose time is up is broken.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager

HOST = socket.gethostname()


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
        path.write_text(json.dumps(body))
        return True

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
