"""Fetch one file from a URL to a local path, verified and atomically published.

A download is either complete and verified under `dest`, or absent: bytes go to a
sibling `.part-*` file that is fsynced, checked against the pins, then renamed.
"""
from __future__ import annotations

import contextlib
import email.utils
import hashlib
import logging
import math
import os
import random
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import unquote_plus, urljoin, urlsplit, urlunsplit

import fsspec
import httpx

from pixelsim.storage import env
from pixelsim.storage.errors import ChecksumError, DownloadError, TransientDownloadError

log = logging.getLogger(__name__)

# set by the CLI to draw a download bar on a terminal: a Prefect task cannot take a callback
# (its arguments are pickled and hashed into the cache key)
progress_hook: Callable[[int, int | None], None] | None = None

CHUNK = 2**20
HEAD = 2**20  # fastai pins archives by the md5 of their first MiB
MAX_REDIRECTS = 10
# The most bytes a source without a pinned size may send: an endless body (or /dev/zero) must
# not fill the disk. The archive caps (storage.archive.Caps) bound what it may unpack to.
MAX_BYTES_ENV = "PIXELSIM_MAX_DOWNLOAD_BYTES"
DEFAULT_MAX_BYTES = 20 * 2**30


# A body that trickles (a byte every 20 s never trips a 30 s read timeout) is given up on once
# an attempt has run MIN_RATE_GRACE_S at under MIN_RATE bytes/s on average; that is a transient
# failure, retried like a timeout.
MIN_RATE = 1024
MIN_RATE_GRACE_S = 60.0


# A server can also trickle its response headers (the status line, then a byte every few seconds,
# each read within the read timeout, never ending them): a request whose headers are not all in
# HEADERS_S after it was sent (redirects included) is given up on, a transient failure like a
# timeout. It bounds the HEAD of a source's fingerprint (storage.sources) as well as the GET.
HEADERS_S = 30.0


def max_bytes() -> int:
    return env.whole(MAX_BYTES_ENV, DEFAULT_MAX_BYTES, 1)
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".zip", ".gz", ".bz2", ".xz")
_SECRET = re.compile(r"^x-(amz|goog)-|token|secret|passw|signature|credential|apikey|accesskey"
                     r"|(^|[_.-])(sig|key|auth|pwd)$", re.IGNORECASE)


@dataclass(frozen=True)
class Pins:
    """What the bytes must be; a field left as None is not checked."""

    size: int | None = None
    sha256: str | None = None
    md5_head: str | None = None


@dataclass(frozen=True)
class Fetched:
    """What was written; `url` is redacted so it can be logged and cached."""

    url: str
    path: str
    size: int
    sha256: str
    md5_head: str


class _Retry(TransientDownloadError):
    """Carries a server's Retry-After so the loop can honour it."""

    def __init__(self, url: str, reason: str, retry_after: float | None = None):
        super().__init__(url, reason)
        self.retry_after = retry_after


def redact(url: str) -> str:
    """Drop userinfo and mask secret-looking query values so URLs are safe to show."""
    parts = urlsplit(url)
    if not parts.netloc and not parts.query:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(
        f"{name}=***" if _SECRET.search(unquote_plus(name)) else f"{name}{sep}{value}"
        for name, sep, value in (p.partition("=") for p in parts.query.split("&"))
    ) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _scrub(text: str, url: str) -> str:
    """Library messages may echo the raw URL or its secrets; mask them."""
    parts = urlsplit(url)
    text = text.replace(url, redact(url))
    hidden = [parts.password or ""]
    if parts.username and parts.username != parts.password:
        hidden.append(parts.username)
    for name, _, value in (p.partition("=") for p in parts.query.split("&")):
        if _SECRET.search(unquote_plus(name)):
            hidden += [value, unquote_plus(value)]
    for secret in sorted(filter(None, hidden), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _cause(exc: BaseException, url: str) -> str:
    return _scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, url)


def redirect_target(chain: Sequence[str], location: str, max_redirects: int = MAX_REDIRECTS) -> str:
    """Decide where a redirect may go: loops, downgrades and odd schemes never help."""
    origin, current = chain[0], chain[-1]
    target = urljoin(current, location.strip())
    src, dst = urlsplit(current).scheme.lower(), urlsplit(target).scheme.lower()
    if dst not in ("http", "https"):
        raise DownloadError(redact(origin), f"redirect to unsupported scheme {redact(target)!r}")
    if src == "https" and dst == "http":
        raise DownloadError(redact(origin), f"refusing https->http downgrade redirect to {redact(target)}")
    if target in chain:
        raise DownloadError(redact(origin), f"redirect loop via {redact(target)}")
    if len(chain) > max_redirects:
        raise DownloadError(redact(origin), f"too many redirects (more than {max_redirects})")
    return target


def retry_after(value: str | None, cap: float) -> float | None:
    """Parse Retry-After (seconds or HTTP date); a server may not park us past `cap`."""
    if not value:
        return None
    try:
        delay = float(value)
    except ValueError:
        try:
            delay = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return min(max(delay, 0.0), cap) if math.isfinite(delay) else None   # "nan", "inf": no advice


class _Part:
    """The partial file plus hashes that always describe exactly its bytes, so resume is free."""

    def __init__(self, fh: BinaryIO, url: str, pins: Pins,
                 progress: Callable[[int, int | None], None] | None = None, path: str = ""):
        self.fh, self.url, self.pins, self.progress, self.path = fh, url, pins, progress, path
        self.total = pins.size
        self.limit = max_bytes()
        self.reset()
        self.begin()

    def begin(self) -> None:
        """Start the clock of one attempt (a resumed attempt counts only its own bytes)."""
        self.began, self.began_at = time.monotonic(), self.n

    def reset(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.n = self.began_at = 0
        self.version: tuple[str, str, int | None] | None = None   # ETag, Last-Modified, size of what we hold
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)

    def write(self, chunk: bytes) -> None:
        size = self.pins.size
        elapsed = time.monotonic() - self.began
        if elapsed > MIN_RATE_GRACE_S and (self.n - self.began_at) / elapsed < MIN_RATE:
            raise _Retry(self.url, f"body arrives at under {MIN_RATE} bytes/s ({self.n - self.began_at} bytes in "
                                   f"{elapsed:.0f} s)")
        if size is None and self.n + len(chunk) > self.limit:
            raise DownloadError(self.url, f"body larger than {self.limit} bytes, the ceiling for a source "
                                          f"without a pinned size: pin it (--sha256), or raise ${MAX_BYTES_ENV}")
        if size is not None and self.n + len(chunk) > size:
            raise ChecksumError(self.url, f"body larger than pinned size: expected {size} bytes, got more")
        if self.n < HEAD:
            self.md5.update(chunk[: HEAD - self.n])
        self.sha.update(chunk)
        try:
            self.fh.write(chunk)
        except OSError as e:   # the write side: the root's disk, not the source, is at fault
            raise DownloadError(self.url, f"cannot write {self.path or 'the download'} after "
                                          f"{self.n:,} bytes: {e.strerror or e}") from e
        self.n += len(chunk)
        if self.progress:
            self.progress(self.n, self.total)


class HeaderDeadline:
    """A wall-clock bound on getting a response's headers, which httpx lacks (its timeouts bound
    each read, and a server may send a byte per read for ever). Pass `trace` as the request's
    `trace` extension (it sees every socket the request connects); call `arrived()` once the
    headers are here. Past the deadline the sockets are shut down, so the blocked read returns
    at once and the request fails; `fired` then says why."""

    def __init__(self, seconds: float | None = None):
        self.seconds = HEADERS_S if seconds is None else seconds
        self.fired = self.done = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True

    @property
    def reason(self) -> str:
        return f"no complete response headers within {self.seconds:g} s of the request"

    def __enter__(self) -> HeaderDeadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def trace(self, event: str, info: dict) -> None:
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            sock = info["return_value"].get_extra_info("socket")
            with self._lock:
                self._sockets.append(sock)
                if self.fired:
                    self._shut(sock)

    def arrived(self) -> bool:
        """The headers are here: stop the clock. False if the deadline passed first (the sockets
        are shut: the response cannot be read)."""
        with self._lock:
            self.done = True
        self._timer.cancel()
        return not self.fired

    def _fire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.fired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):   # already closed, or its descriptor taken over by TLS
            sock.shutdown(socket.SHUT_RDWR)


def changed(version: tuple[str, str, int | None] | None, headers: Any, total: int | None) -> bool:
    """Whether a resumed response describes another file than the bytes we hold came from."""
    if version is None:
        return False
    etag, modified, size = version
    return any(a and b and a != b for a, b in ((etag, headers.get("etag", "")),
                                                (modified, headers.get("last-modified", "")))) \
        or (size is not None and total is not None and size != total)


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    return (int(m[1]), None if m[3] == "*" else int(m[3])) if m else None


def _expects_archive(urls: Sequence[str], pins: Pins) -> bool:
    return pins != Pins() or any(urlsplit(u).path.lower().endswith(ARCHIVE_SUFFIXES) for u in urls)


def _looks_like_html(head: bytes) -> bool:
    """A web page rather than an archive: no archive starts with '<' once whitespace is skipped."""
    return head.lstrip(b" \t\r\n\xef\xbb\xbf")[:1] == b"<"


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port


def _http_attempt(client: httpx.Client, url: str, part: _Part, pins: Pins, cap: float,
                  headers: dict[str, str]) -> None:
    shown = redact(url)
    with HeaderDeadline() as deadline:
        try:
            _http_exchange(client, url, part, pins, cap, headers, deadline)
        except (httpx.HTTPError, _Retry) as exc:
            if deadline.fired:   # the deadline cut the request short: that is the cause, not how it ended
                raise _Retry(shown, deadline.reason) from exc
            raise


def _http_exchange(client: httpx.Client, url: str, part: _Part, pins: Pins, cap: float,
                   headers: dict[str, str], deadline: HeaderDeadline) -> None:
    shown = redact(url)
    chain = [url]
    while True:
        # identity + iter_raw: pins describe the stored bytes, and servers often
        # label a .tgz as Content-Encoding: gzip, which httpx would then inflate.
        hdrs = {**headers, "Accept-Encoding": "identity"}
        if _origin(chain[-1]) != _origin(url):  # caller's credentials are for the origin only
            hdrs = {k: v for k, v in hdrs.items() if k.lower() not in ("authorization", "cookie")}
        if part.n:
            hdrs["Range"] = f"bytes={part.n}-"
            etag, modified, _ = part.version or ("", "", None)
            # the rest only if the file is still the one we hold the start of (else a 200 with all of it)
            strong = etag if etag and not etag.startswith("W/") else ""
            if strong or modified:
                hdrs["If-Range"] = strong or modified
        with client.stream("GET", chain[-1], headers=hdrs, extensions={"trace": deadline.trace}) as r:
            status = r.status_code
            if status in REDIRECT_STATUS and "location" in r.headers:
                chain.append(redirect_target(chain, r.headers["location"]))
                continue
            if not deadline.arrived():
                raise _Retry(shown, deadline.reason)
            if status in TRANSIENT_STATUS:
                raise _Retry(shown, f"HTTP {status} {r.reason_phrase}",
                             retry_after(r.headers.get("retry-after"), cap))
            if status == 416 and part.n:
                if r.headers.get("content-range", "").rpartition("/")[2].strip() == str(part.n):
                    return  # we already hold every byte
                part.reset()
                raise _Retry(shown, "HTTP 416 on resume; restarting from zero")
            if status not in (200, 206):
                raise DownloadError(shown, f"HTTP {status} {r.reason_phrase}")
            encoding = r.headers.get("content-encoding", "").strip().lower()
            if encoding not in ("", "identity"):   # its bytes are an encoding of the file, not the file
                raise DownloadError(shown, f"the server sent it with Content-Encoding: {encoding[:40]} though "
                                           "identity was asked for, so its bytes are not the file's; fetch it from a "
                                           "server that sends the file as it is")
            length = r.headers.get("content-length", "")
            length_n = int(length) if length.isdigit() else None
            rng = _content_range(r.headers.get("content-range"))
            if status == 206:
                if rng is None or rng[0] != part.n:
                    reason = (f"bad Content-Range {r.headers.get('content-range')!r} for a resume "
                              f"at byte {part.n}; restarting from zero")
                    part.reset()
                    raise _Retry(shown, reason)
                total = rng[1] if rng[1] is not None else None if length_n is None else part.n + length_n
                if changed(part.version, r.headers, total):   # a server that ignored If-Range, or sent none
                    part.reset()
                    raise _Retry(shown, "the file changed between attempts (ETag, Last-Modified or size "
                                        "differ); restarting from zero")
            else:
                if part.n:
                    log.info("%s ignored Range; restarting from zero", shown)
                    part.reset()
                total = length_n
            ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
            html = ctype == "text/html" and _expects_archive(chain, pins)   # the bytes decide: see below
            if pins.size is None and total is not None and total > part.limit:
                raise DownloadError(shown, f"server announces {total} bytes, over the {part.limit}-byte ceiling "
                                           f"for a source without a pinned size: pin it, or raise ${MAX_BYTES_ENV}")
            if pins.size is not None and total is not None and total != pins.size:
                raise ChecksumError(shown, f"size mismatch: expected {pins.size} bytes, "
                                           f"server announces {total}")
            part.total = total if total is not None else part.total
            if part.n == 0:
                part.version = (r.headers.get("etag", ""), r.headers.get("last-modified", ""), total)
            for chunk in r.iter_raw():  # unchunked: a chunker would drop buffered bytes on error
                if html:   # labelled HTML: refused only if the bytes are a page, not an archive mislabelled
                    html = False
                    if part.n == 0 and _looks_like_html(chunk):
                        raise DownloadError(shown, "server returned an HTML page instead of the file "
                                                   "(login wall, error page or moved dataset?)")
                part.write(chunk)
            if total is not None and part.n < total:
                raise _Retry(shown, f"body cut short: got {part.n} of {total} bytes")
            return


def _fsspec_attempt(url: str, part: _Part, storage_options: dict) -> None:
    part.reset()  # generic filesystems give no portable resume
    if "://" not in url or url.startswith("file://"):   # a FIFO would block for ever, a device never end
        path = url.removeprefix("file://")
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise DownloadError(redact(url), _cause(exc, url)) from exc
        if not stat.S_ISREG(mode):
            raise DownloadError(redact(url), "not a regular file (a FIFO, device or socket): give an archive file "
                                             "or a folder")
    try:
        with fsspec.open(url, "rb", **storage_options) as src:
            part.total = getattr(src, "size", None) or part.total
            while chunk := src.read(CHUNK):
                part.write(chunk)
    except (TimeoutError, ConnectionError) as exc:
        raise _Retry(redact(url), _cause(exc, url)) from exc
    except (OSError, ValueError, ImportError) as exc:
        raise DownloadError(redact(url), _cause(exc, url)) from exc


def _attempt(client: httpx.Client | None, url: str, part: _Part, pins: Pins, cap: float,
             opts: dict) -> None:
    """One try; maps library errors onto transient vs permanent."""
    part.begin()
    if client is None:
        return _fsspec_attempt(url, part, opts)
    try:
        _http_attempt(client, url, part, pins, cap, opts.get("headers", {}))
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError,
            httpx.ProxyError) as exc:
        raise _Retry(redact(url), _cause(exc, url)) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise DownloadError(redact(url), _cause(exc, url)) from exc


def _verify(shown: str, part: _Part, pins: Pins) -> None:
    got = {"size": part.n, "md5_head": part.md5.hexdigest(), "sha256": part.sha.hexdigest()}
    for field in ("size", "md5_head", "sha256"):
        want = getattr(pins, field)
        if isinstance(want, str):
            want = want.strip().lower()
        if want is not None and want != got[field]:
            raise ChecksumError(shown, f"{field} mismatch: expected {want}, got {got[field]}")


def _fsync_dir(path: str) -> None:
    """Make the rename durable; unsupported on some platforms, where it is skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fetch(url: str, dest: str | os.PathLike[str], *, pins: Pins | None = None, attempts: int = 5,
          backoff: float = 0.5, max_backoff: float = 30.0, timeout: float = 30.0,
          storage_options: dict | None = None,
          sleep: Callable[[float], object] = time.sleep,
          progress: Callable[[int, int | None], None] | None = None) -> Fetched:
    """Download `url` to `dest`, retrying transient failures and resuming where the server allows.

    For http(s), `storage_options["headers"]` are sent with each request; for other
    schemes `storage_options` go to `fsspec.open`. `progress(bytes so far, total or None)` is
    called as bytes arrive (default: the module's `progress_hook`).
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    pins = pins or Pins()
    opts = dict(storage_options or {})
    dest = os.fspath(dest)
    shown = redact(url)
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{dest}.part-{secrets.token_hex(6)}"
    # os.open rather than mkstemp: mkstemp's 0600 would leak onto the published file
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    is_http = urlsplit(url).scheme.lower() in ("http", "https")
    try:
        with os.fdopen(fd, "wb+") as fh:
            part = _Part(fh, shown, pins, progress or progress_hook, path=dest)
            client = httpx.Client(timeout=timeout, follow_redirects=False) if is_http else None
            with client or contextlib.nullcontext():
                for i in range(attempts):
                    try:
                        _attempt(client, url, part, pins, max_backoff, opts)
                        break
                    except _Retry as exc:
                        if i + 1 == attempts:
                            raise TransientDownloadError(
                                shown, f"gave up after {attempts} attempt(s); last error: {exc.reason}") from exc
                        delay = exc.retry_after
                        if delay is None:
                            delay = random.uniform(0, min(max_backoff, backoff * 2**i))
                        log.warning("fetch %s failed (attempt %d/%d): %s; retrying in %.2fs",
                                    shown, i + 1, attempts, exc.reason, delay)
                        sleep(delay)
            fh.flush()
            os.fsync(fh.fileno())
            _verify(shown, part, pins)
            result = Fetched(shown, dest, part.n, part.sha.hexdigest(), part.md5.hexdigest())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(parent)
    return result
