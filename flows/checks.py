"""What can be told wrong about a request before Prefect starts, in well under a second: an
unknown named dataset, a local source that is not there, and, when the root already holds the
archive, a split or class that it does not have. Each raises OptionError naming the option."""
from __future__ import annotations

import difflib
import os
import posixpath

from pixelsim.flows.datasets import DATASETS
from pixelsim.storage.errors import IntegrityError, LayoutError, OptionError
from pixelsim.storage.root import MANIFEST, Root
from pixelsim.tasks.contracts import Request


def check_request(request: Request) -> None:
    if request.source is None and request.dataset not in DATASETS:
        close = difflib.get_close_matches(request.dataset, list(DATASETS), n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise OptionError(f"--dataset {request.dataset}: not a named dataset; {hint}"
                          f"named ones: {', '.join(DATASETS)} (or pass --source)")
    source = request.source
    if source and _local(source):
        path = source.removeprefix("file://")
        if not os.path.exists(path):
            raise OptionError(f"--source {source}: no such file or folder")
        if not (os.path.isfile(path) or os.path.isdir(path)):
            raise OptionError(f"--source {source}: not a regular file or folder (a FIFO, device or socket)")
    check_names(request)


def _local(source: str) -> bool:
    return "://" not in source or source.startswith("file://")


def cached_archive(request: Request) -> str | None:
    """The archive folder in the root that this request's download would reuse, found without
    the network (pinned sources, local files), if the root holds it."""
    from pixelsim.storage.sources import fingerprint
    from pixelsim.tasks.download import archive_dir, in_root

    if request.source:
        pins = {"sha256": request.sha256} if request.sha256 else {}
        if not pins and not _local(request.source):
            return None   # an unpinned URL may hold other bytes now: only its download can tell
        found = [(request.source, pins, {} if pins else fingerprint(request.source, skip=Root(request.root).skip()))]
    else:
        ds = DATASETS[request.dataset]
        found = [(ds.source_url(), ds.pins, None)] + ([(ds.bundled_path(), ds.bundled_pins, None)] if ds.bundled else [])
    for url, pins, fp in found:
        if in_root(request.root, url, pins) if fp is None else _published(request.root, archive_dir(url, pins, fp)):
            return archive_dir(url, pins, fp)
    return None


def _published(root: str, rel: str) -> bool:
    try:
        return Root(root).exists(posixpath.join(rel, MANIFEST))
    except (OSError, ValueError):
        return False


def check_names(request: Request) -> None:
    """--train-split, --valid-split and --classes against the cached archive's folders."""
    from pixelsim.storage.layout import check_names as check
    from pixelsim.tasks.untar import tree_dir

    o = request.options
    if not (o.classes or o.train_split or o.valid_split):
        return
    try:
        rel = cached_archive(request)
        if rel is None:
            return
        root = Root(request.root)
        sha = root.manifest(rel)["record"]["sha256"]
        folders = root.manifest(tree_dir(sha))["dirs"]
    except (OSError, ValueError, LookupError, TypeError, IntegrityError):
        return   # not unpacked yet, unreadable or damaged: the steps rebuild it, or find out and say so
    try:
        check(folders, train_split=o.train_split, valid_split=o.valid_split,
              classes=list(o.classes) if o.classes else None)
    except LayoutError as e:
        raise OptionError(str(e)) from None
