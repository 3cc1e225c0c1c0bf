"""The PIXELSIM_* environment variables that tune a run, parsed strictly in one place.

A value that cannot be read is an OptionError naming the variable, raised when a run's
request is checked (`tasks.contracts.check_environment`), before any work: never silently
ignored, never a traceback half-way through a run.
"""
from __future__ import annotations

import os
from pathlib import Path

from pixelsim.storage.errors import OptionError

OFFLINE = "PIXELSIM_OFFLINE"
LOCK_DIR = "PIXELSIM_LOCK_DIR"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def whole(name: str, default: int, minimum: int) -> int:
    """$name as a whole number of at least `minimum` (ASCII digits only); `default` when unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not (value.isascii() and value.isdigit()) or int(value) < minimum:
        raise OptionError(f"{name}={value!r}: expected a whole number, at least {minimum}")
    return int(value)


def flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise OptionError(f"{name}={os.environ[name]!r}: expected 1 or 0 (true/false, yes/no, on/off)")
    return value in _TRUE


def folder(name: str) -> Path | None:
    """$name as a folder that is one, or can be made one; None when unset. A path naming a file
    is refused rather than replaced: it is the user's, outside the storage root."""
    value = os.environ.get(name, "")
    if not value.strip():
        return None
    path = Path(value)
    for at in (path, *path.parents):   # the nearest part of it that exists must be a folder
        if at.exists() or at.is_symlink():
            if not at.is_dir():
                raise OptionError(f"{name}={value!r}: not a folder" + ("" if at == path else f" ({at} is a file)"))
            break
    return path
