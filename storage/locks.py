"""Step locks that a killed run cannot keep, with no dependency on Prefect.

A lock is a file `<key>.lock` holding its holder, host, process and expiry. It is created with
its content in one step (written under a temporary name, then hard-linked onto the lock's
name, which fails if the lock exists), so it is never seen empty. A lock whose process is gone
(same host) or whose time is up is broken by the next one who wants it.

A holder is recognised by its process's identity, not its pid alone: the boot id and the
process's start time (`identity`), so a pid that a later process reuses (after a container
restart, or a long uptime) does not keep a dead run's lock for an hour.

A holder on another host (another container or machine on the same volume) cannot be asked
whether it lives: every holder touches its lock files every HEARTBEAT_S, and a lock untouched
for STALE_S (by its mtime, or as watched on the waiter's own clock when clocks disagree) is a
dead holder's, broken by the next who wants it.

A file that cannot be parsed (written by hand, or in place by another tool) counts as held
while it is fresh, and is broken once it has been left that way for EMPTY_STALE_S.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from pixelsim.storage.errors import PixelsimError

HOST = socket.gethostname()
EMPTY_STALE_S = 10.0
POLL_S = 0.1
HEARTBEAT_S = 10.0
STALE_S = 120.0   # twelve missed heartbeats: room for a busy machine and clocks a minute apart

_held: set[Path] = set()
_held_lock = threading.Lock()
_beating: threading.Thread | None = None


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _held_lock:
            paths = list(_held)
        for path in paths:
            try:
                os.utime(path)
            except OSError:
                pass   # released meanwhile, or broken by someone who thought us dead


def _hold(path: Path) -> None:
    global _beating
    with _held_lock:
        _held.add(path)
        if _beating is None or not _beating.is_alive():
            _beating = threading.Thread(target=_beat, name="pixelsim-lock-heartbeat", daemon=True)
            _beating.start()


def _let_go(path: Path) -> None:
    with _held_lock:
        _held.discard(path)


def identity(pid: int) -> str | None:
    """`<boot id>:<start time in clock ticks>` of a process on this host, None where /proc has
    no answer (another OS, or the process is gone)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"   # field 22, after the (comm) field
    except (OSError, IndexError):
        return None


def alive(pid: int, ident: str | None = None) -> bool:
    """Whether the process exists on this host; with `ident` (from `identity`), whether it is
    still that process rather than a later one that was given the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if ident is not None:
        now = identity(pid)
        return now is None or now == ident
    return True


def _earlier_self(ident: str | None) -> bool:
    """Whether a lock recording this process's pid was written by an earlier process given the same
    pid (a container restarted: its run is pid 1 again, on the same hostname), not by this one."""
    now = identity(os.getpid())
    return ident is not None and now is not None and ident != now


def _expired(expiration: object) -> bool:
    if isinstance(expiration, (int, float)):
        return time.time() > expiration
    if isinstance(expiration, str):
        try:
            return datetime.fromisoformat(expiration).timestamp() < time.time()
        except ValueError:
            return False
    return False


class ExpiringLockManager:
    """Locks in one folder. `repair`: a file in the folder's place is damage to remove (only for a
    folder pixelsim owns, the storage root's `_locks`); otherwise it is refused, never deleted."""

    def __init__(self, lock_files_directory: Path, hold_timeout: float = 3600.0, repair: bool = False):
        self.dir = Path(lock_files_directory)
        self.hold_timeout = hold_timeout
        self.repair = repair
        self._seen: dict[str, tuple[tuple[int, int, int], float]] = {}   # key: (file signature, first seen)

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.lock"

    def _info(self, key: str) -> dict | None:
        """The lock's details; None when free (a stale unreadable file is removed first)."""
        path = self._path(key)
        try:
            info = json.loads(path.read_bytes())
            if not isinstance(info, dict):
                raise ValueError("not an object")
            return info
        except FileNotFoundError:
            return None
        except ValueError:
            try:
                if time.time() - path.stat().st_mtime > EMPTY_STALE_S:
                    path.unlink(missing_ok=True)
                    return None
            except FileNotFoundError:
                return None
            return {"holder": None}

    def is_locked(self, key: str) -> bool:
        """Held by someone alive; a dead or expired holder's lock is broken on the way."""
        info = self._info(key)
        if info is None:
            return False
        pid = info.get("pid")
        ident = info.get("identity") if isinstance(info.get("identity"), str) else None
        dead = info.get("host") == HOST and isinstance(pid, int) and (
            not alive(pid, ident) if pid != os.getpid() else _earlier_self(ident))
        if dead or _expired(info.get("expiration")) or self._stale(key):
            self._path(key).unlink(missing_ok=True)
            self._seen.pop(key, None)
            return False
        return True

    def _stale(self, key: str) -> bool:
        """Untouched for STALE_S: its holder, wherever it runs, stopped its heartbeat.

        Judged by the file's age, and also by watching it: a lock whose file has not changed for
        STALE_S of this process's own clock is stale, so a holder whose clock runs ahead (another
        host, or an mtime set in the future) cannot make a dead lock look fresh until its expiry."""
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            self._seen.pop(key, None)
            return False
        if time.time() - st.st_mtime > STALE_S:
            return True
        signature, now = (st.st_ino, st.st_mtime_ns, st.st_size), time.monotonic()
        seen = self._seen.get(key)
        if seen is None or seen[0] != signature:
            self._seen[key] = (signature, now)
            return False
        return now - seen[1] > STALE_S

    def is_lock_holder(self, key: str, holder: str) -> bool:
        info = self._info(key)
        return info is not None and info.get("holder") == holder

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        """Take the lock, waiting up to `acquire_timeout` seconds (None: as long as it takes)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:   # a file where the lock folder goes
            if not self.repair:
                raise PixelsimError(f"{self.dir}: not a folder (step locks go there); left as it is") from None
            self.dir.unlink()     # damage in the root (locks are never kept): repaired
            self.dir.mkdir(parents=True, exist_ok=True)
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        body = json.dumps({"holder": holder, "host": HOST, "pid": os.getpid(), "identity": identity(os.getpid()),
                           "expiration": time.time() + (hold_timeout or self.hold_timeout)}).encode()
        tmp = self.dir / f".{key}.{os.getpid()}-{threading.get_ident()}.tmp"
        tmp.write_bytes(body)
        told = False
        try:
            while True:
                try:
                    self._create(tmp, self._path(key), body)
                    _hold(self._path(key))
                    return True
                except FileExistsError:
                    if self.is_lock_holder(key, holder):
                        _hold(self._path(key))
                        return True
                    if not self.is_locked(key):
                        continue          # broken just now: try again at once
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                if not told:   # say who is in the way, once, so a wait is never silent
                    told = True
                    info = self._info(key) or {}
                    logging.getLogger("pixelsim").warning(
                        "waiting for %s: held by %s (pid %s on %s) until it finishes, dies, or stops its "
                        "heartbeat for %.0f s", self._path(key), info.get("holder"), info.get("pid"), info.get("host"),
                        STALE_S)
                time.sleep(POLL_S)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _create(tmp: Path, path: Path, body: bytes) -> None:
        """Create `path` holding `body`, failing with FileExistsError if it exists."""
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: create exclusively, then write
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(body)

    def release_lock(self, key: str, holder: str) -> None:
        _let_go(self._path(key))
        if self.is_lock_holder(key, holder):
            self._path(key).unlink(missing_ok=True)
