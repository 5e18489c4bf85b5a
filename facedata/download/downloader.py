"""Fetch one URL robustly: retries with backoff, Retry-After, redirects, size caps, opt-out, sniffing.

One `Downloader` is shared by all threads of a shard task; its urllib3 pool keeps connections
alive per host. urllib3's own retries and redirects are off so that every rule lives here:

- only http(s) URLs, also after a redirect (else invalid_url);
- timeouts, connection errors, truncated bodies, 429 and 5xx are retried with exponential backoff
  plus jitter; a Retry-After (seconds or HTTP date) on 429/503 is honoured up to
  `max_retry_after`, and a longer one gives up at once rather than stall a worker;
- the body is streamed and cut off at `max_bytes` (too_large), rejected up front when the
  Content-Length already says so;
- `X-Robots-Tag: noai` / `noimageai` (any user-agent prefix) means opted_out;
- the magic bytes, not the Content-Type header, decide whether the body is an image
  (servers often send images as application/octet-stream, and error pages as image/jpeg).

`fetch` never raises for network, HTTP or URL problems: it returns a `FetchResult` whose `status`
is one of the names in `facedata.core.records`.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    IncompleteRead,
    LocationValueError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from facedata.core import records
from facedata.core.config import DownloadConfig

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_RETRY_AFTER_CODES = frozenset({429, 503})
_OPTOUT_DIRECTIVES = frozenset({"noai", "noimageai"})
_CHUNK = 64 * 1024
# Error bodies up to this size are read and dropped so the connection can be reused; longer
# (or unknown-length) ones close the connection instead.
_DRAIN_LIMIT = 64 * 1024
# Most ftyp brands that mark an AVIF or HEIF still image.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def sniff_image_format(data: bytes) -> str | None:
    """Name the image format from its magic bytes ("jpeg", "png", "gif", "webp", "bmp", "tiff",
    "avif", "heif"), or None when the bytes are not a known image format."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    # "BM" alone is too weak; the DIB header size that follows the 14-byte file header is not.
    if data.startswith(b"BM") and int.from_bytes(data[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if data[4:8] == b"ftyp":
        box_end = min(int.from_bytes(data[:4], "big"), len(data))
        # The major brand, then (after a 4-byte minor version) the compatible brands.
        brands = {data[8:12]} | {data[i : i + 4] for i in range(16, box_end - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "avif"
        if brands & _HEIF_BRANDS:
            return "heif"
    return None


def is_opted_out(robots_tags: list[str]) -> bool:
    """True when any X-Robots-Tag value carries noai or noimageai, e.g. "googlebot: noai, noindex"."""
    return any(
        token in _OPTOUT_DIRECTIVES
        for value in robots_tags
        for token in re.split(r"[\s,:]+", value.lower())
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT; a naive one here came without a zone name
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class FetchResult:
    status: str
    data: bytes | None
    http_status: int | None
    content_type: str | None
    error: str | None
    attempts: int
    seconds: float
    final_url: str | None


@dataclass
class _Attempt:
    """What one try (including its redirects) produced, and whether another try may help."""

    status: str
    error: str | None = None
    data: bytes | None = None
    http_status: int | None = None
    content_type: str | None = None
    final_url: str | None = None
    retry: bool = False
    retry_after: float | None = None


def _url_problem(url: object) -> str | None:
    """Why `url` cannot be fetched, or None when it is an http(s) URL with a host."""
    if not isinstance(url, str):
        return f"URL is not a string: {url!r}"
    try:
        parsed = urllib3.util.parse_url(url)
    except LocationValueError as err:
        return f"unparsable URL {url!r}: {err}"
    if parsed.scheme is None:
        return f"not an absolute URL: {url!r}"
    if parsed.scheme not in ("http", "https"):
        return f"unsupported scheme {parsed.scheme!r} in {url!r} (only http and https)"
    if not parsed.host:
        return f"no host in URL {url!r}"
    return None


def _network_failure(err: Exception, url: str, timeout: float) -> _Attempt:
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2, so it must be tested first.
    if isinstance(err, NewConnectionError):
        reason = str(err).split(": ", 1)[-1]
        return _Attempt(records.CONNECTION_ERROR, f"cannot connect: {reason}", final_url=url, retry=True)
    if isinstance(err, (ConnectTimeoutError, ReadTimeoutError)):
        return _Attempt(records.TIMEOUT, f"no response within {timeout:g}s", final_url=url, retry=True)
    return _Attempt(records.CONNECTION_ERROR, _one_line(f"{type(err).__name__}: {err}"), final_url=url, retry=True)


def _discard(resp: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back: drain a short body so keep-alive survives, else close it."""
    remaining = resp.length_remaining
    if remaining is not None and remaining <= _DRAIN_LIMIT:
        resp.drain_conn()
    else:
        resp.close()
    resp.release_conn()


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Downloader:
    """Thread-safe fetcher; share one instance across a ThreadPoolExecutor of cfg.concurrency threads."""

    def __init__(self, cfg: DownloadConfig) -> None:
        self.cfg = cfg
        self._timeout = urllib3.Timeout(connect=cfg.timeout, read=cfg.timeout)
        # maxsize covers every thread talking to one host at once, so no connection is thrown away.
        self._pool = urllib3.PoolManager(
            num_pools=max(100, cfg.concurrency),
            maxsize=cfg.concurrency,
            block=False,
            retries=False,
            timeout=self._timeout,
            headers={"User-Agent": cfg.user_agent, "Accept": "image/*"},
        )

    def fetch(self, url: str) -> FetchResult:
        start = time.monotonic()
        problem = _url_problem(url)
        if problem:
            return FetchResult(records.INVALID_URL, None, None, None, problem, 0, time.monotonic() - start, None)
        attempts = 0
        while True:
            attempts += 1
            outcome = self._attempt(url)
            if not outcome.retry or attempts > self.cfg.retries:
                break
            time.sleep(self._delay(attempts, outcome.retry_after))
        if outcome.retry and attempts > 1:
            outcome.error = f"{outcome.error} (after {attempts} attempts)"
        return FetchResult(
            status=outcome.status,
            data=outcome.data,
            http_status=outcome.http_status,
            content_type=outcome.content_type,
            error=outcome.error,
            attempts=attempts,
            seconds=time.monotonic() - start,
            final_url=outcome.final_url,
        )

    def _delay(self, attempts: int, retry_after: float | None) -> float:
        # Jitter spreads retries from many threads so they do not hit a struggling host together.
        backoff = self.cfg.backoff * 2 ** (attempts - 1) * random.uniform(1.0, 1.25)
        return backoff if retry_after is None else max(retry_after, backoff)

    def _attempt(self, url: str) -> _Attempt:
        """One try: follow redirects, then judge the final response."""
        redirects = 0
        while True:
            try:
                resp = self._pool.request("GET", url, preload_content=False, redirect=False)
            except LocationValueError as err:
                return _Attempt(records.INVALID_URL, _one_line(f"unparsable URL {url!r}: {err}"), final_url=url)
            except HTTPError as err:
                return _network_failure(err, url, self.cfg.timeout)
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECT_CODES or not location:
                try:
                    return self._judge(resp, url)
                finally:
                    _discard(resp)
            _discard(resp)
            if redirects == self.cfg.max_redirects:
                return _Attempt(
                    records.TOO_MANY_REDIRECTS,
                    f"more than {self.cfg.max_redirects} redirects",
                    http_status=resp.status,
                    final_url=url,
                )
            redirects += 1
            url = urljoin(url, location)
            problem = _url_problem(url)
            if problem:
                return _Attempt(records.INVALID_URL, f"redirected to {problem}", http_status=resp.status, final_url=url)

    def _judge(self, resp: urllib3.BaseHTTPResponse, url: str) -> _Attempt:
        code = resp.status
        content_type = resp.headers.get("Content-Type")
        failed = _Attempt(records.http_status(code), http_status=code, content_type=content_type, final_url=url)
        if not 200 <= code < 300:
            failed.error = f"HTTP {code} {resp.reason or ''}".rstrip()
            if code in _RETRY_AFTER_CODES:
                failed.retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                if failed.retry_after is not None and failed.retry_after > self.cfg.max_retry_after:
                    failed.error += f"; Retry-After {failed.retry_after:g}s exceeds {self.cfg.max_retry_after:g}s"
                    return failed
            failed.retry = code == 429 or code >= 500
            return failed

        if self.cfg.respect_optout:
            tags = resp.headers.getlist("X-Robots-Tag")
            if is_opted_out(tags):
                failed.status = records.OPTED_OUT
                failed.error = f"X-Robots-Tag: {_one_line(', '.join(tags))}"
                return failed

        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_bytes:
            failed.status = records.TOO_LARGE
            failed.error = f"Content-Length {declared} over max_bytes {self.cfg.max_bytes}"
            return failed

        body = bytearray()
        try:
            for chunk in resp.stream(_CHUNK):
                body += chunk
                if len(body) > self.cfg.max_bytes:
                    failed.status = records.TOO_LARGE
                    failed.error = f"body over max_bytes {self.cfg.max_bytes}"
                    return failed
        except ReadTimeoutError:
            failed.status = records.TIMEOUT
            failed.error = f"body stalled for {self.cfg.timeout:g}s after {len(body)} bytes"
            failed.retry = True
            return failed
        except (ProtocolError, IncompleteRead) as err:
            failed.status = records.TRUNCATED
            failed.error = f"body cut off after {len(body)} of {declared or '?'} bytes ({type(err).__name__})"
            failed.retry = True
            return failed
        except HTTPError as err:  # e.g. a Content-Encoding that does not decode
            failed.status = records.CONNECTION_ERROR
            failed.error = _one_line(f"{type(err).__name__} while reading the body: {err}")
            failed.retry = True
            return failed

        data = bytes(body)
        if sniff_image_format(data) is None:
            failed.status = records.NOT_IMAGE
            failed.error = f"not an image (Content-Type: {content_type or 'none'}; starts with {data[:16]!r})"
            return failed
        return _Attempt(records.OK, data=data, http_status=code, content_type=content_type, final_url=url)

    def close(self) -> None:
        self._pool.clear()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
