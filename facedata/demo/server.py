"""A loopback HTTP server with fault routes, so the downloader meets real failures offline.

Serves the files under `root` on 127.0.0.1 (HTTP/1.1 keep-alive, one daemon thread per connection,
a free port by default). Content-Type is guessed from the file extension. Paths that escape
`root` or name no file get 404. Fault routes put a prefix in front of the served file's path:

    /slow/<seconds>/<file>                  sleep, then serve (for timeouts)
    /status/<code>                          reply with that status and a small text body
    /flaky/<n>/<file>                       the first n requests get 500, later ones 200
    /ratelimit/<n>/<retry_after>/<file>     the first n requests get 429 + Retry-After, later ones 200
    /truncate/<file>                        declare the full Content-Length, send half, close
    /chunked/<file>                         chunked transfer encoding, no Content-Length
    /as/<type>/<subtype>/<file>             serve with that Content-Type (e.g. /as/text/html/x.jpg)
    /redirect/<file>                        302 to /<file>
    /redirect-loop/<n>                      302 to itself, forever
    /optout/<tag>/<file>                    serve with X-Robots-Tag: <tag> (e.g. noai, noimageai)
    /html                                   a small HTML page

/flaky and /ratelimit count requests per exact request target, query string included, so a
caller gets a fresh counter by appending e.g. `?run=2`. Usage::

    with LoopbackServer(tmp_dir) as server:
        url = server.url("flaky/1/photo.jpg")
"""

from __future__ import annotations

import mimetypes
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

_HTML_PAGE = b"<!doctype html><html><head><title>facedata</title></head><body><p>Not an image.</p></body></html>\n"
_CHUNK = 64 * 1024


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Benchmarks open dozens of connections at once; the default backlog of 5 drops SYNs.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], root: Path) -> None:
        super().__init__(address, _Handler)
        self.root = root
        self.hits: Counter[str] = Counter()
        self.hits_lock = threading.Lock()

    def count_hit(self, key: str) -> int:
        """Return how many requests `key` has had, this one included."""
        with self.hits_lock:
            self.hits[key] += 1
            return self.hits[key]

    def handle_error(self, request, client_address) -> None:
        # A client that timed out and hung up is the point of /slow, not a server error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without this, Nagle plus delayed ACK adds
    # ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args) -> None:
        """Quiet: no per-request logging."""

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p]
        route = parts[0] if parts else ""
        try:
            if route == "slow" and len(parts) >= 3:
                time.sleep(float(parts[1]))
                self._serve_file(parts[2:])
            elif route == "status" and len(parts) == 2:
                code = int(parts[1])
                self._send_text(code, f"status {code}\n")
            elif route == "flaky" and len(parts) >= 3:
                if self.server.count_hit(self.path) <= int(parts[1]):
                    self._send_text(500, "flaky: failing on purpose\n")
                else:
                    self._serve_file(parts[2:])
            elif route == "ratelimit" and len(parts) >= 4:
                if self.server.count_hit(self.path) <= int(parts[1]):
                    self._send_text(429, "rate limited\n", {"Retry-After": parts[2]})
                else:
                    self._serve_file(parts[3:])
            elif route == "truncate" and len(parts) >= 2:
                self._serve_file(parts[1:], truncate=True)
            elif route == "chunked" and len(parts) >= 2:
                self._serve_file(parts[1:], chunked=True)
            elif route == "as" and len(parts) >= 4:
                self._serve_file(parts[3:], content_type=f"{parts[1]}/{parts[2]}")
            elif route == "redirect" and len(parts) >= 2:
                self._redirect(quote("/" + "/".join(parts[1:])))
            elif route == "redirect-loop" and len(parts) == 2:
                self._redirect(quote(path))
            elif route == "optout" and len(parts) >= 3:
                self._serve_file(parts[2:], headers={"X-Robots-Tag": parts[1]})
            elif route == "html" and len(parts) == 1:
                self._send(200, _HTML_PAGE, "text/html; charset=utf-8")
            else:
                self._serve_file(parts)
        except ValueError:
            self._send_text(400, f"bad route parameters: {path}\n")

    def _resolve(self, parts: list[str]) -> Path | None:
        root = self.server.root
        target = root.joinpath(*parts).resolve() if parts else root
        if target.is_relative_to(root) and target.is_file():
            return target
        return None

    def _serve_file(
        self,
        parts: list[str],
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
        truncate: bool = False,
        chunked: bool = False,
    ) -> None:
        target = self._resolve(parts)
        if target is None:
            self._send_text(404, "not found\n")
            return
        body = target.read_bytes()
        content_type = content_type or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if chunked:
            self._send_chunked(body, content_type)
        elif truncate:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        else:
            self._send(200, body, content_type, headers)

    def _send_chunked(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(body), _CHUNK):
            chunk = body[start : start + _CHUNK]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def _redirect(self, location: str) -> None:
        self._send_text(302, f"see {location}\n", {"Location": location})

    def _send_text(self, code: int, text: str, headers: dict[str, str] | None = None) -> None:
        self._send(code, text.encode(), "text/plain; charset=utf-8", headers)

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        # 1xx, 204 and 304 responses must not carry a body.
        if code < 200 or code in (204, 304):
            body = b""
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class LoopbackServer:
    """Serve `root` over HTTP on a background thread; see the module docstring for the routes."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackServer:
        if self._server is not None:
            raise RuntimeError("LoopbackServer is already running")
        self._server = _Server((self.host, self.port), self.root)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    def url(self, path: str = "") -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
