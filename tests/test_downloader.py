"""The downloader against a real loopback server: real photos, real sockets, real faults."""

from __future__ import annotations

import io
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

from facedata.core import records
from facedata.core.config import DownloadConfig
from facedata.download.downloader import Downloader, is_opted_out, parse_retry_after, sniff_image_format
from facedata.core.packages import package_dir
from facedata.demo.server import LoopbackServer

FAST = dict(timeout=0.5, retries=2, backoff=0.01, max_retry_after=2.0)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A web root with two real photos, a small PNG and an HTML page."""
    root = tmp_path_factory.mktemp("site")
    people = package_dir("openpeople") / "data" / "curated"
    shutil.copy(people / "P001" / "assets" / "amateur_selfie.jpg", root / "selfie.jpg")
    shutil.copy(people / "P002" / "assets" / "studio_portrait.jpg", root / "portrait.jpg")
    shutil.copy(package_dir("skimage") / "data" / "chessboard_RGB.png", root / "chess.png")
    (root / "page.html").write_text("<!DOCTYPE html><html><body>hello</body></html>\n")
    return root


@pytest.fixture(scope="module")
def server(site):
    with LoopbackServer(site) as srv:
        yield srv


@pytest.fixture(scope="module")
def dl():
    with Downloader(DownloadConfig(**FAST)) as downloader:
        yield downloader


def test_serves_real_jpeg(dl, server, site):
    r = dl.fetch(server.url("selfie.jpg"))
    assert r.status == records.OK, r.error
    assert r.data == (site / "selfie.jpg").read_bytes()
    assert (r.http_status, r.content_type, r.error, r.attempts) == (200, "image/jpeg", None, 1)
    assert r.final_url == server.url("selfie.jpg")


def test_slow_server_times_out_after_all_retries(dl, server):
    r = dl.fetch(server.url("slow/3/chess.png"))
    assert r.status == records.TIMEOUT
    assert r.attempts == 3 and r.data is None and r.http_status is None
    assert "0.5s" in r.error


def test_500_then_200_succeeds_on_retry(dl, server, site):
    r = dl.fetch(server.url("flaky/1/chess.png"))
    assert r.status == records.OK and r.attempts == 2
    assert r.data == (site / "chess.png").read_bytes()


def test_persistent_5xx_gives_up_after_retries(dl, server):
    r = dl.fetch(server.url("status/500"))
    assert (r.status, r.http_status, r.attempts, r.data) == ("http_500", 500, 3, None)


def test_429_waits_for_retry_after(dl, server):
    r = dl.fetch(server.url("ratelimit/1/1/chess.png"))
    assert r.status == records.OK and r.attempts == 2
    assert r.seconds >= 0.95  # it waited the second the server asked for, not the 10 ms backoff


def test_429_with_retry_after_over_max_gives_up_at_once(dl, server):
    r = dl.fetch(server.url("ratelimit/1/60/chess.png"))
    assert (r.status, r.http_status, r.attempts) == ("http_429", 429, 1)
    assert "Retry-After 60s" in r.error


def test_429_with_retry_after_as_http_date(dl, server):
    when = format_datetime(datetime.now(timezone.utc) + timedelta(minutes=5), usegmt=True)
    r = dl.fetch(server.url(f"ratelimit/1/{quote(when)}/chess.png"))
    assert (r.status, r.attempts) == ("http_429", 1)


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: retry now
    future = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=100), usegmt=True)
    assert 95 < parse_retry_after(future) <= 100
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_truncated_body(dl, server):
    r = dl.fetch(server.url("truncate/portrait.jpg"))
    assert r.status == records.TRUNCATED and r.data is None
    assert r.attempts == 3  # a cut connection is worth retrying
    assert "cut off" in r.error


def test_html_is_not_an_image_whatever_the_header_says(dl, server):
    r = dl.fetch(server.url("as/image/jpeg/page.html"))
    assert r.status == records.NOT_IMAGE and r.data is None
    assert "image/jpeg" in r.error
    r = dl.fetch(server.url("html"))
    assert r.status == records.NOT_IMAGE and "text/html" in r.error


def test_image_with_wrong_header_is_ok(dl, server, site):
    r = dl.fetch(server.url("as/application/octet-stream/selfie.jpg"))
    assert r.status == records.OK and r.content_type == "application/octet-stream"
    assert r.data == (site / "selfie.jpg").read_bytes()


def test_redirect_is_followed(dl, server, site):
    r = dl.fetch(server.url("redirect/chess.png"))
    assert r.status == records.OK and r.final_url == server.url("chess.png")
    assert r.data == (site / "chess.png").read_bytes()


def test_redirect_loop(dl, server):
    r = dl.fetch(server.url("redirect-loop/1"))
    assert (r.status, r.http_status, r.attempts) == (records.TOO_MANY_REDIRECTS, 302, 1)


def test_max_redirects_zero_refuses_any_redirect(server):
    with Downloader(DownloadConfig(**FAST, max_redirects=0)) as dl0:
        assert dl0.fetch(server.url("redirect/chess.png")).status == records.TOO_MANY_REDIRECTS
        assert dl0.fetch(server.url("chess.png")).status == records.OK


class _RecordingHandler(BaseHTTPRequestHandler):
    """Remembers request headers; /ftp redirects off the web."""

    seen: list[dict[str, str]] = []

    def do_GET(self):
        self.seen.append(dict(self.headers))
        location = "ftp://127.0.0.1/chess.png" if self.path == "/ftp" else "/missing"
        self.send_response(302 if self.path == "/ftp" else 404)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    _RecordingHandler.seen.clear()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_redirect_to_non_http_scheme_is_invalid(dl, recorder):
    r = dl.fetch(recorder + "/ftp")
    assert r.status == records.INVALID_URL and "ftp" in r.error
    assert r.final_url == "ftp://127.0.0.1/chess.png"


def test_sends_user_agent_and_accept(recorder):
    cfg = DownloadConfig(**FAST, user_agent="facedata-test/1.0")
    with Downloader(cfg) as d:
        assert d.fetch(recorder + "/x").status == "http_404"
    assert _RecordingHandler.seen[0]["User-Agent"] == "facedata-test/1.0"
    assert _RecordingHandler.seen[0]["Accept"] == "image/*"


def test_body_over_max_bytes(server):
    with Downloader(DownloadConfig(**FAST, max_bytes=10_000)) as small:
        r = small.fetch(server.url("selfie.jpg"))  # rejected on its Content-Length
        assert r.status == records.TOO_LARGE and "Content-Length" in r.error
        r = small.fetch(server.url("chunked/selfie.jpg"))  # no length: cut off while streaming
        assert r.status == records.TOO_LARGE and r.data is None
        assert small.fetch(server.url("chunked/chess.png")).status == records.OK


@pytest.mark.parametrize("tag", ["noai", "noimageai", "NoImageAI", "googlebot: noai", "noindex, noai"])
def test_optout_header(dl, server, tag):
    r = dl.fetch(server.url(f"optout/{quote(tag)}/chess.png"))
    assert r.status == records.OPTED_OUT and r.data is None
    assert tag in r.error


def test_other_robots_tags_are_fine(dl, server):
    assert dl.fetch(server.url("optout/noindex/chess.png")).status == records.OK
    assert dl.fetch(server.url(f"optout/{quote('noai-friendly')}/chess.png")).status == records.OK


def test_optout_can_be_ignored(server):
    with Downloader(DownloadConfig(**FAST, respect_optout=False)) as d:
        assert d.fetch(server.url("optout/noai/chess.png")).status == records.OK


def test_is_opted_out():
    assert is_opted_out(["noindex", "otherbot: noimageai"])
    assert not is_opted_out(["noindex, nofollow"])
    assert not is_opted_out([])


def test_404_is_not_retried(dl, server):
    r = dl.fetch(server.url("no/such/file.jpg"))
    assert (r.status, r.http_status, r.attempts) == ("http_404", 404, 1)


def test_paths_outside_root_are_404(dl, server):
    assert dl.fetch(server.url("%2e%2e/%2e%2e/etc/passwd")).status == "http_404"


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "not a url", "", "http://", "http://[::1/x.jpg", None])
def test_invalid_urls(dl, url):
    r = dl.fetch(url)
    assert r.status == records.INVALID_URL and r.attempts == 0
    assert r.error and "\n" not in r.error


def test_connection_refused():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Downloader(DownloadConfig(**FAST)) as d:
        r = d.fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert r.status == records.CONNECTION_ERROR and r.attempts == 3
    assert "refused" in r.error.lower()


def test_concurrent_fetches_lose_nothing(server, site):
    names = ["selfie.jpg", "portrait.jpg", "chess.png", "chunked/chess.png"]
    urls = [server.url(f"{names[i % 4]}?i={i}") for i in range(200)]
    with Downloader(DownloadConfig(**FAST, concurrency=16)) as d, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(d.fetch, urls))
    assert len(results) == 200
    for i, r in enumerate(results):
        assert r.status == records.OK, (urls[i], r.error)
        assert r.data == (site / names[i % 4].removeprefix("chunked/")).read_bytes()


def _encoded(fmt: str) -> bytes:
    photo = package_dir("openpeople") / "data" / "curated" / "P003" / "assets" / "studio_portrait.jpg"
    with Image.open(photo) as im:
        small = im.convert("RGB").resize((64, 64))
    buf = io.BytesIO()
    small.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt, name",
    [("JPEG", "jpeg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tiff"), ("AVIF", "avif")],
)
def test_sniff_real_encodings(fmt, name):
    assert sniff_image_format(_encoded(fmt)) == name


def test_sniff_rejects_non_images():
    assert sniff_image_format(b"") is None
    assert sniff_image_format(b"<!DOCTYPE html><html>") is None
    assert sniff_image_format(b"BM is also how this sentence starts") is None
    assert sniff_image_format(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2") is None  # an MP4 video
    assert sniff_image_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
