"""Typed errors: the flow retries TransientError and fails fast on the rest.

Every message names the file, member or URL at fault so a user can act on it.
"""
from __future__ import annotations

from collections.abc import Callable


def shown(text: object) -> str:
    """Text from the data (member names, class folders) fit for a terminal or a log line: control
    characters, newlines and bidirectional overrides escaped, so a name can neither forge a line
    nor recolour or reorder one."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class PixelsimError(Exception):
    """A permanent, user-facing failure: retrying will not help. Its message is one line, or
    several of our own (a list of bad files): no character of it can drive a terminal."""

    def __init__(self, *args: object):
        if len(args) == 1 and isinstance(args[0], str):
            args = ("\n".join(shown(line) for line in args[0].split("\n")),)
        super().__init__(*args)


class TransientError(PixelsimError):
    """A failure that may succeed on retry (timeouts, 5xx, a body cut short)."""


class DownloadError(PixelsimError):
    """A source could not be fetched; names the URL and the cause."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(f"{url}: {reason}")


class TransientDownloadError(DownloadError, TransientError):
    """A download failure worth retrying."""


class ChecksumError(DownloadError):
    """The bytes fetched are not the bytes pinned."""


class OneLine(PixelsimError):
    """An error whose message is one line by design: a newline in it came from the data."""

    def __init__(self, message: str):
        super().__init__(shown(message))


class ArchiveError(OneLine):
    """An archive is corrupt, unsafe or over its caps; names the member."""


class CorruptArchive(ArchiveError):
    """The archive's bytes do not decode: damaged, or cut short (at its source, too)."""


class ImageError(PixelsimError):
    """A file is not a readable image of the expected kind; names the file."""


class LayoutError(OneLine):
    """The dataset tree is not <split>/<class>/<image> as expected."""


class IntegrityError(PixelsimError):
    """A stored artifact does not match its manifest."""


class MemberChanged(IntegrityError):
    """An unpacked archive's member no longer has the bytes it was unpacked with: the cached
    unpacking is damaged (the pipeline unpacks the archive again), not the image."""


class NotPublished(IntegrityError):
    """An output folder has no manifest: never built, or its build did not finish."""


class StorageError(OneLine):
    """The storage root's backend refused (no credentials, no such bucket, access denied);
    names the root and the backend's reason."""


# modules whose exceptions are a storage backend's, not ours: fsspec's object stores and their clients
BACKENDS = ("botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "google", "adlfs", "azure", "fsspec", "aiohttp")


def caused_by(e: BaseException | None, test: Callable[[BaseException], bool]) -> BaseException | None:
    """The first of `e` and the errors that caused it (explicitly or while handling) that passes `test`."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if test(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def backend_failure(e: BaseException) -> BaseException | None:
    """The storage backend's exception in `e` or its causes, if any."""
    return caused_by(e, lambda x: type(x).__module__.split(".")[0] in BACKENDS)


def first_line(e: BaseException) -> str:
    """A foreign error in one line: its type and the first line of its message."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text.strip() else 'no detail'}"


class OptionError(PixelsimError, ValueError):
    """An option value that cannot work; names the option (a usage error: exit status 2)."""
