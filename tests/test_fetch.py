"""storage.fetch against local HTTP servers that misbehave on purpose."""
from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pixelsim.storage.errors import ChecksumError, DownloadError, TransientDownloadError
from pixelsim.storage.fetch import Fetched, Pins, fetch, redact, redirect_target, retry_after

DATA = random.Random(0).randbytes(3 * 2**19)  # 1.5 MiB: md5_head differs from the full md5
SHA = hashlib.sha256(DATA).hexdigest()
MD5_HEAD = hashlib.md5(DATA[: 2**20]).hexdigest()
PINS = Pins(size=len(DATA), sha256=SHA, md5_head=MD5_HEAD)

Behaviour = Callable[["Handler", int], None]


class Handler(BaseHTTPRequestHandler):
    server: "Server"

    def do_GET(self) -> None:
        with self.server.lock:
            index = len(self.server.requests)
            self.server.requests.append((self.path, dict(self.headers)))
        self.server.behaviour(self, index)

    do_HEAD = do_GET   # the behaviour sees self.command

    def log_message(self, *args: object) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              length: int | None = None) -> None:
        """Send `body`; a `length` above len(body) cuts the body short."""
        self.send_response(status)
        headers = {"Content-Type": "application/octet-stream", **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.behaviour: Behaviour = lambda h, i: h.reply(200, DATA)

    def url(self, path: str = "/data.bin", userinfo: str = "") -> str:
        host, port = self.server_address[:2]
        return f"http://{userinfo}{host}:{port}{path}"

    @property
    def ranges(self) -> list[str | None]:
        return [h.get("Range") for _, h in self.requests]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


def run(url: str, dest: Path, sleeps: list[float], **kw: object) -> Fetched:
    kw.setdefault("backoff", 0.01)
    return fetch(url, str(dest), sleep=sleeps.append, **kw)  # type: ignore[arg-type]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def serve_range(h: Handler) -> None:
    """A server that honours Range, as a resume needs."""
    rng = h.headers.get("Range")
    if not rng:
        return h.reply(200, DATA)
    start = int(rng.removeprefix("bytes=").rstrip("-"))
    h.reply(206, DATA[start:], {"Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"})


def test_happy_path_with_all_pins(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    dest = tmp_path / "sub" / "data.bin"
    got = run(server.url(), dest, sleeps, pins=PINS)
    assert dest.read_bytes() == DATA
    assert got == Fetched(server.url(), str(dest), len(DATA), SHA, MD5_HEAD)
    assert MD5_HEAD != hashlib.md5(DATA).hexdigest()
    assert len(server.requests) == 1 and server.requests[0][1]["Accept-Encoding"] == "identity"
    assert leftovers(dest.parent) == ["data.bin"] and sleeps == []


def test_unpinned_download_still_reports_hashes(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    got = run(server.url(), tmp_path / "d", sleeps)
    assert (got.size, got.sha256, got.md5_head) == (len(DATA), SHA, MD5_HEAD)


def test_sha256_mismatch_leaves_nothing(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    with pytest.raises(ChecksumError) as err:
        run(server.url(), tmp_path / "data.bin", sleeps, pins=Pins(sha256="0" * 64))
    msg = str(err.value)
    assert server.url() in msg and "0" * 64 in msg and SHA in msg
    assert leftovers(tmp_path) == []
    assert len(server.requests) == 1  # a checksum mismatch is not retried


def test_md5_head_mismatch(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    with pytest.raises(ChecksumError, match="md5_head mismatch"):
        run(server.url(), tmp_path / "d", sleeps, pins=Pins(md5_head="f" * 32))
    assert leftovers(tmp_path) == []


def test_failure_keeps_previous_dest_untouched(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    dest = tmp_path / "d"
    dest.write_bytes(b"old")
    with pytest.raises(ChecksumError):
        run(server.url(), dest, sleeps, pins=Pins(sha256="0" * 64))
    assert dest.read_bytes() == b"old" and leftovers(tmp_path) == ["d"]


def test_404_fails_at_once(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(404, b"nope")
    with pytest.raises(DownloadError) as err:
        run(server.url(), tmp_path / "d", sleeps)
    assert not isinstance(err.value, TransientDownloadError)
    assert "404" in str(err.value) and server.url() in str(err.value)
    assert len(server.requests) == 1 and sleeps == []
    assert leftovers(tmp_path) == []


def test_503_twice_then_ok(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(503) if i < 2 else h.reply(200, DATA)
    got = run(server.url(), tmp_path / "d", sleeps, pins=PINS, backoff=0.5, max_backoff=0.75)
    assert got.sha256 == SHA and len(server.requests) == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 0.75


def test_429_honours_retry_after(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(429, headers={"Retry-After": "2"}) if i == 0 else h.reply(200, DATA)
    run(server.url(), tmp_path / "d", sleeps)
    assert sleeps == [2.0] and len(server.requests) == 2


def test_retry_after_is_capped(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(503, headers={"Retry-After": "3600"}) if i == 0 else h.reply(200, DATA)
    run(server.url(), tmp_path / "d", sleeps, max_backoff=5)
    assert sleeps == [5.0]


def test_retry_after_parsing() -> None:
    assert retry_after("7", 30) == 7.0
    assert retry_after(None, 30) is None and retry_after("soon", 30) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 30) == 0.0  # in the past
    assert retry_after("Fri, 01 Jan 2100 00:00:00 GMT", 30) == 30.0
    for junk in ("nan", "inf", "-inf", "1e999"):   # no advice, not a crash in time.sleep
        assert retry_after(junk, 30) is None, junk


def test_exhausted_retries_name_url_attempts_and_cause(server: Server, tmp_path: Path,
                                                        sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(502)
    with pytest.raises(TransientDownloadError) as err:
        run(server.url(), tmp_path / "d", sleeps, attempts=3)
    msg = str(err.value)
    assert server.url() in msg and "3 attempt" in msg and "502" in msg
    assert len(server.requests) == 3 and len(sleeps) == 2 and leftovers(tmp_path) == []


def test_cut_body_resumes_with_range(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    half = len(DATA) // 2

    def behaviour(h: Handler, i: int) -> None:
        if i == 0:
            h.reply(200, DATA[:half], length=len(DATA))
        else:
            serve_range(h)

    server.behaviour = behaviour
    dest = tmp_path / "d"
    got = run(server.url(), dest, sleeps, pins=PINS)
    assert server.ranges == [None, f"bytes={half}-"]
    assert dest.read_bytes() == DATA and got.sha256 == SHA
    assert leftovers(tmp_path) == ["d"]


OTHER = bytes(reversed(DATA))   # the same size, other bytes: a new version published mid-download


@pytest.mark.parametrize("honours_if_range", [True, False])
def test_a_file_changed_between_attempts_is_fetched_again_whole(server: Server, tmp_path: Path,
                                                                 sleeps: list[float], honours_if_range: bool) -> None:
    """A resume asks for the rest only of the version it holds (If-Range); a server that answers
    206 from another version anyway (its ETag differs) is not spliced onto the first part."""
    half = len(DATA) // 2

    def behaviour(h: Handler, i: int) -> None:
        if i == 0:
            return h.reply(200, DATA[:half], {"ETag": '"v1"'}, length=len(DATA))
        rng, if_range = h.headers.get("Range"), h.headers.get("If-Range")
        if rng and (not honours_if_range or if_range == '"v2"'):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            return h.reply(206, OTHER[start:], {"ETag": '"v2"', "Content-Range": f"bytes {start}-{len(OTHER) - 1}/"
                                                                                   f"{len(OTHER)}"})
        h.reply(200, OTHER, {"ETag": '"v2"'})

    server.behaviour = behaviour
    dest = tmp_path / "d"
    got = run(server.url(), dest, sleeps)
    assert dest.read_bytes() == OTHER and got.sha256 == hashlib.sha256(OTHER).hexdigest()
    assert server.requests[1][1].get("If-Range") == '"v1"'


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    half = len(DATA) // 2
    server.behaviour = lambda h, i: h.reply(200, DATA[:half], length=len(DATA)) if i == 0 else h.reply(200, DATA)
    dest = tmp_path / "d"
    got = run(server.url(), dest, sleeps)
    assert server.ranges == [None, f"bytes={half}-"]
    assert dest.read_bytes() == DATA and got.size == len(DATA)  # not half + full


def test_wrong_content_range_restarts_from_zero(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    half = len(DATA) // 2

    def behaviour(h: Handler, i: int) -> None:
        if i == 0:
            h.reply(200, DATA[:half], length=len(DATA))
        elif i == 1:  # claims to resume from byte 0 while we asked for `half`
            h.reply(206, DATA, {"Content-Range": f"bytes 0-{len(DATA) - 1}/{len(DATA)}"})
        else:
            serve_range(h)

    server.behaviour = behaviour
    dest = tmp_path / "d"
    run(server.url(), dest, sleeps, pins=PINS)
    assert server.ranges == [None, f"bytes={half}-", None]
    assert dest.read_bytes() == DATA


def test_stalled_body_times_out_and_gives_up(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    def behaviour(h: Handler, i: int) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(DATA)))
        h.end_headers()
        h.wfile.write(DATA[:1000])
        h.wfile.flush()
        server.release.wait(3)

    server.behaviour = behaviour
    with pytest.raises(TransientDownloadError) as err:
        run(server.url(), tmp_path / "d", sleeps, attempts=2, timeout=0.5)
    assert "ReadTimeout" in str(err.value) and "2 attempt" in str(err.value)
    assert len(server.requests) == 2 and server.ranges[1] == "bytes=1000-"
    assert leftovers(tmp_path) == []


def test_unreachable_https_is_transient(tmp_path: Path, sleeps: list[float]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientDownloadError, match="ConnectError"):
        run(f"https://127.0.0.1:{port}/x.tgz", tmp_path / "d", sleeps, attempts=2)
    assert len(sleeps) == 1 and leftovers(tmp_path) == []


def test_html_page_for_archive_is_permanent(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(200, b"<html>login</html>", {"Content-Type": "text/html; charset=utf-8"})
    with pytest.raises(DownloadError, match="HTML page") as err:
        run(server.url("/mnist.tgz"), tmp_path / "d", sleeps)
    assert not isinstance(err.value, TransientDownloadError)
    assert len(server.requests) == 1 and leftovers(tmp_path) == []


def test_an_archive_served_as_text_html_is_judged_by_its_bytes(server: Server, tmp_path: Path,
                                                                sleeps: list[float]) -> None:
    """A misconfigured server labels a .tgz text/html: its bytes are an archive, so it is kept."""
    server.behaviour = lambda h, i: h.reply(200, DATA, {"Content-Type": "text/html"})
    got = run(server.url("/mnist.tgz"), tmp_path / "d", sleeps, pins=PINS)
    assert got.sha256 == SHA and (tmp_path / "d").read_bytes() == DATA


def test_an_archive_sent_content_encoded_though_identity_was_asked_is_one_line(server: Server, tmp_path: Path,
                                                                                sleeps: list[float]) -> None:
    """Stored as sent, a gzip-encoded .tgz failed later as a corrupt archive, with advice to
    --refresh that could never help. The encoding is named, once, and nothing is kept."""
    import gzip
    server.behaviour = lambda h, i: h.reply(200, gzip.compress(DATA), {"Content-Encoding": "gzip"})
    with pytest.raises(DownloadError, match="Content-Encoding: gzip though identity was asked for") as err:
        run(server.url("/mnist.tgz"), tmp_path / "d", sleeps)
    assert not isinstance(err.value, TransientDownloadError)
    assert len(server.requests) == 1 and leftovers(tmp_path) == []
    assert server.requests[0][1].get("Accept-Encoding") == "identity"
    server.behaviour = lambda h, i: h.reply(200, DATA, {"Content-Encoding": "identity"})
    assert run(server.url("/mnist.tgz"), tmp_path / "d", sleeps, pins=PINS).sha256 == SHA


def test_html_is_fine_when_no_archive_expected(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(200, b"<html></html>", {"Content-Type": "text/html"})
    assert run(server.url("/index.html"), tmp_path / "d", sleeps).size == 13


def test_oversized_body_aborts_early(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    def behaviour(h: Handler, i: int) -> None:  # no Content-Length: only streaming can tell
        h.send_response(200)
        h.end_headers()
        h.wfile.write(DATA)
        h.close_connection = True

    server.behaviour = behaviour
    with pytest.raises(ChecksumError, match="larger than pinned size"):
        run(server.url(), tmp_path / "d", sleeps, pins=Pins(size=1000))
    assert len(server.requests) == 1 and leftovers(tmp_path) == []


def test_announced_size_mismatch_fails_before_body(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    with pytest.raises(ChecksumError, match=f"announces {len(DATA)}"):
        run(server.url(), tmp_path / "d", sleeps, pins=Pins(size=len(DATA) + 1))
    assert len(server.requests) == 1


def test_redirect_is_followed(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(302, headers={"Location": "/data.bin"}) if h.path == "/old" else h.reply(200, DATA)
    got = run(server.url("/old"), tmp_path / "d", sleeps, pins=PINS)
    assert got.sha256 == SHA and [p for p, _ in server.requests] == ["/old", "/data.bin"]


def test_redirect_loop_is_permanent(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(302, headers={"Location": "/b" if h.path == "/a" else "/a"})
    with pytest.raises(DownloadError, match="redirect loop") as err:
        run(server.url("/a"), tmp_path / "d", sleeps)
    assert not isinstance(err.value, TransientDownloadError)
    assert [p for p, _ in server.requests] == ["/a", "/b"] and leftovers(tmp_path) == []


def test_too_many_redirects(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(301, headers={"Location": f"/r{i + 1}"})
    with pytest.raises(DownloadError, match="too many redirects"):
        run(server.url("/r0"), tmp_path / "d", sleeps)
    assert len(server.requests) == 11  # the original request plus 10 redirects


def test_redirect_decisions() -> None:
    assert redirect_target(["https://a.org/x"], "/y?q=1") == "https://a.org/y?q=1"
    assert redirect_target(["http://a.org/x"], "https://cdn.org/y") == "https://cdn.org/y"
    with pytest.raises(DownloadError, match="downgrade") as err:
        redirect_target(["https://u:pw@a.org/x?token=t0k"], "http://a.org/x")
    assert "pw" not in str(err.value) and "t0k" not in str(err.value)
    with pytest.raises(DownloadError, match="downgrade"):  # the current hop decides, not the origin
        redirect_target(["http://a.org/x", "https://b.org/y"], "http://c.org/z")
    with pytest.raises(DownloadError, match="unsupported scheme"):
        redirect_target(["https://a.org/x"], "file:///etc/passwd")
    with pytest.raises(DownloadError, match="loop"):
        redirect_target(["https://a.org/x", "https://a.org/y"], "/x")
    with pytest.raises(DownloadError, match="too many"):
        redirect_target([f"https://a.org/{i}" for i in range(11)], "/next")


def test_local_path_and_file_url(tmp_path: Path, sleeps: list[float]) -> None:
    src = tmp_path / "src.tgz"
    src.write_bytes(DATA)
    for i, url in enumerate([str(src), src.as_uri()]):
        dest = tmp_path / "out" / f"copy{i}.tgz"
        got = run(url, dest, sleeps, pins=PINS)
        assert dest.read_bytes() == DATA and got.url == url and got.sha256 == SHA
    assert leftovers(tmp_path / "out") == ["copy0.tgz", "copy1.tgz"]


def test_missing_local_file_is_permanent(tmp_path: Path, sleeps: list[float]) -> None:
    missing = tmp_path / "missing.tgz"
    with pytest.raises(DownloadError) as err:
        run(str(missing), tmp_path / "out" / "d", sleeps)
    assert not isinstance(err.value, TransientDownloadError)
    assert str(missing) in str(err.value) and sleeps == []
    assert leftovers(tmp_path / "out") == []


def test_credentials_never_in_errors_or_result(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    server.behaviour = lambda h, i: h.reply(200, DATA) if h.path.startswith("/ok") else h.reply(403)
    with pytest.raises(DownloadError) as err:
        run(server.url("/missing?token=s3cr3t&x=1", userinfo="alice:hunter2@"), tmp_path / "d", sleeps)
    msg = str(err.value)
    assert "hunter2" not in msg and "s3cr3t" not in msg and "alice" not in msg
    assert "403" in msg and "token=***&x=1" in msg
    assert server.requests[0][1]["Authorization"].startswith("Basic ")  # the creds were still used
    got = run(server.url("/ok?sig=abc", userinfo="alice:hunter2@"), tmp_path / "d", sleeps)
    assert got.url == server.url("/ok?sig=***")


def test_credentials_not_leaked_by_transient_errors(tmp_path: Path, sleeps: list[float]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientDownloadError) as err:
        run(f"http://bob:pa55word@127.0.0.1:{port}/x?X-Amz-Signature=deadbeef", tmp_path / "d", sleeps, attempts=1)
    assert "pa55word" not in str(err.value) and "deadbeef" not in str(err.value)


@pytest.mark.parametrize(("url", "want"), [
    ("https://user:pw@host.org/a.tgz", "https://host.org/a.tgz"),
    ("https://host.org/a.tgz?token=abc&v=2", "https://host.org/a.tgz?token=***&v=2"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=c%2Fd&X-Amz-Signature=ff&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=***"),
    ("https://h/p?sig=1&signature=2&key=3&api_key=4&secret=5&password=6&keyword=7",
     "https://h/p?sig=***&signature=***&key=***&api_key=***&secret=***&password=***&keyword=7"),
    ("https://h/p?q=a%20b&flag", "https://h/p?q=a%20b&flag"),
    ("/data/local.tgz", "/data/local.tgz"),
    ("s3://bucket/key.tgz", "s3://bucket/key.tgz"),
])
def test_redact(url: str, want: str) -> None:
    assert redact(url) == want


def test_attempts_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        fetch("/x", str(tmp_path / "d"), attempts=0)


def test_published_file_is_not_private(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    if os.name != "posix":
        pytest.skip("POSIX modes only")
    old = os.umask(0o022)
    try:
        dest = tmp_path / "d"
        run(server.url(), dest, sleeps)
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == 0o644


def test_credentials_not_leaked_by_fsspec_errors(tmp_path: Path, sleeps: list[float]) -> None:
    # fsspec echoes the path it failed on, userinfo included
    with pytest.raises(DownloadError) as err:
        run("memory://alice:hunter2@bucket/missing.tgz", tmp_path / "d", sleeps)
    msg = str(err.value)
    assert "FileNotFoundError" in msg and "missing.tgz" in msg
    assert "hunter2" not in msg and "alice" not in msg


def test_server_capping_range_size_is_resumed(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    cap = 2**19

    def behaviour(h: Handler, i: int) -> None:  # answers each request with at most `cap` bytes
        start = int((h.headers.get("Range") or "bytes=0-").removeprefix("bytes=").rstrip("-"))
        end = min(start + cap, len(DATA))
        h.reply(206, DATA[start:end], {"Content-Range": f"bytes {start}-{end - 1}/{len(DATA)}"})

    server.behaviour = behaviour
    dest = tmp_path / "d"
    run(server.url(), dest, sleeps, pins=PINS)
    assert server.ranges == [None, f"bytes={cap}-", f"bytes={2 * cap}-"]
    assert dest.read_bytes() == DATA


def test_auth_headers_stay_with_their_origin(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    other = Server()  # same host, other port: another origin
    threading.Thread(target=other.serve_forever, args=(0.02,), daemon=True).start()
    try:
        server.behaviour = lambda h, i: h.reply(302, headers={"Location": other.url("/blob")})
        got = run(server.url("/x.tgz"), tmp_path / "d", sleeps, pins=PINS,
                  storage_options={"headers": {"Authorization": "Bearer t0k", "X-Trace": "1"}})
    finally:
        other.shutdown()
        other.server_close()
    assert got.sha256 == SHA
    assert server.requests[0][1]["Authorization"] == "Bearer t0k"
    assert "Authorization" not in other.requests[0][1] and other.requests[0][1]["X-Trace"] == "1"


def test_html_after_redirect_from_archive_url(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    def behaviour(h: Handler, i: int) -> None:
        if h.path == "/mnist.tgz":
            h.reply(302, headers={"Location": "/signin"})
        else:
            h.reply(200, b"<html>sign in</html>", {"Content-Type": "text/html"})

    server.behaviour = behaviour
    with pytest.raises(DownloadError, match="HTML page"):
        run(server.url("/mnist.tgz"), tmp_path / "d", sleeps)
    assert [p for p, _ in server.requests] == ["/mnist.tgz", "/signin"]


def test_416_when_every_byte_is_already_here(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    def behaviour(h: Handler, i: int) -> None:
        if i == 0:  # whole body, but announced one byte longer: looks cut short
            h.reply(200, DATA, length=len(DATA) + 1)
        else:
            h.reply(416, headers={"Content-Range": f"bytes */{len(DATA)}"})

    server.behaviour = behaviour
    dest = tmp_path / "d"
    got = run(server.url(), dest, sleeps)  # no size pin: the announced size is wrong
    assert server.ranges == [None, f"bytes={len(DATA)}-"]
    assert dest.read_bytes() == DATA and got.sha256 == SHA


def test_https_to_http_downgrade_fails_fast_inside_fetch(tmp_path: Path, sleeps: list[float],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The redirect decision is wired into the download: no request ever goes out over http."""
    import httpx

    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:  # an in-process https server
        seen.append(str(request.url))
        if request.url.scheme == "https":
            return httpx.Response(302, headers={"Location": "http://data.example/mnist.tgz"})
        return httpx.Response(200, content=DATA)

    real = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(answer), **kw))
    with pytest.raises(DownloadError, match="refusing https->http downgrade") as err:
        run("https://data.example/mnist.tgz?token=t0k", tmp_path / "d", sleeps)
    assert not isinstance(err.value, TransientDownloadError)
    assert "https://data.example/mnist.tgz?token=***" in str(err.value) and "t0k" not in str(err.value)
    assert seen == ["https://data.example/mnist.tgz?token=t0k"] and sleeps == [] and leftovers(tmp_path) == []


def test_an_unpinned_endless_body_stops_at_the_ceiling(server: Server, tmp_path: Path, sleeps: list[float],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """No pinned size, no Content-Length, a body that never ends: stopped at the ceiling, not retried."""
    monkeypatch.setenv("PIXELSIM_MAX_DOWNLOAD_BYTES", str(2**20))

    def endless(h: Handler, i: int) -> None:
        h.send_response(200)
        h.end_headers()
        try:
            while not server.release.is_set():
                h.wfile.write(DATA[:65536])
        except OSError:
            pass
        h.close_connection = True

    server.behaviour = endless
    with pytest.raises(DownloadError, match=r"larger than 1048576 bytes.*PIXELSIM_MAX_DOWNLOAD_BYTES"):
        run(server.url(), tmp_path / "d", sleeps)
    assert len(server.requests) == 1 and leftovers(tmp_path) == []


def test_an_announced_size_over_the_ceiling_is_refused_before_the_body(server: Server, tmp_path: Path,
                                                                        sleeps: list[float],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXELSIM_MAX_DOWNLOAD_BYTES", "1000")
    server.behaviour = lambda h, i: h.reply(200, DATA)
    with pytest.raises(DownloadError, match=f"announces {len(DATA)} bytes, over the 1000-byte ceiling"):
        run(server.url(), tmp_path / "d", sleeps)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_local_source_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, sleeps: list[float],
                                                                       kind: str) -> None:
    """A FIFO would block the run for ever and /dev/zero would never end."""
    if kind == "fifo":
        source = tmp_path / "pipe"
        os.mkfifo(source)
    else:
        source = Path("/dev/zero")
    (tmp_path / "out").mkdir()
    with pytest.raises(DownloadError, match="not a regular file"):
        run(str(source), tmp_path / "out" / "d", sleeps)
    assert leftovers(tmp_path / "out") == []


def test_a_trickling_body_is_given_up_on_not_waited_for(server: Server, tmp_path: Path, sleeps: list[float],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte at a time, each within the read timeout: below the minimum rate past the grace
    period, an attempt is a transient failure; the last one names the rate."""
    import time

    import pixelsim.storage.fetch as fetch_module

    monkeypatch.setattr(fetch_module, "MIN_RATE_GRACE_S", 0.3)

    def trickle(h: Handler, i: int) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(DATA)))
        h.end_headers()
        try:
            for b in DATA[:40]:
                h.wfile.write(bytes([b]))
                h.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass
        h.close_connection = True

    server.behaviour = trickle
    with pytest.raises(TransientDownloadError, match=r"gave up after 2 attempt.*under 1024 bytes/s"):
        run(server.url("/slow.tgz"), tmp_path / "d", sleeps, attempts=2)
    assert len(server.requests) == 2 and leftovers(tmp_path) == []


def test_response_headers_that_trickle_are_given_up_on_for_the_get_and_the_head(
        server: Server, tmp_path: Path, sleeps: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    """The status line, then a header byte at a time, never ending them: each read is well within
    the read timeout, so only a deadline on the whole headers ends it. The GET is a transient
    failure, retried and given up on naming the URL; the fingerprint's HEAD too."""
    import time

    import pixelsim.storage.fetch as fetch_module
    from pixelsim.storage.sources import fingerprint

    monkeypatch.setattr(fetch_module, "HEADERS_S", 0.5)

    def trickle_headers(h: Handler, i: int) -> None:
        try:
            h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not h.server.release.is_set():
                h.wfile.write(b"a")
                h.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass
        h.close_connection = True

    server.behaviour = trickle_headers
    with pytest.raises(TransientDownloadError, match=r"gave up after 2 attempt.*no complete response headers "
                                                     r"within 0.5 s") as e:
        run(server.url("/slow.tgz"), tmp_path / "d", sleeps, attempts=2)
    assert e.value.url == server.url("/slow.tgz")
    assert len(server.requests) == 2 and leftovers(tmp_path) == []
    with pytest.raises(TransientDownloadError, match=r"HEAD: no complete response headers within 0.5 s") as e:
        fingerprint(server.url("/slow.tgz"))
    assert e.value.url == server.url("/slow.tgz") and len(server.requests) == 3


def test_headers_in_time_are_not_cut_by_the_deadline(server: Server, tmp_path: Path, sleeps: list[float],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline bounds the headers only: a body that takes longer than it is read to the end."""
    import time

    import pixelsim.storage.fetch as fetch_module

    monkeypatch.setattr(fetch_module, "HEADERS_S", 0.3)

    def slow_body(h: Handler, i: int) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(DATA)))
        h.end_headers()
        for k in range(0, len(DATA), len(DATA) // 4):
            time.sleep(0.2)
            h.wfile.write(DATA[k:k + len(DATA) // 4])
        h.close_connection = True

    server.behaviour = slow_body
    assert run(server.url(), tmp_path / "d", sleeps, pins=PINS).sha256 == SHA and sleeps == []
