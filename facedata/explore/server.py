"""`facedata explore PATH`: a local web page over a run directory, served on 127.0.0.1.

The page (static/index.html, app.js, style.css, shipped in the package) asks this server for
JSON: the funnel, facet counts, pages of samples, one sample, identities; and for images and
thumbnails by sample key. It never receives more rows than one page shows.

Security, because a run holds other people's text and the server runs on the curator's machine:
- it binds 127.0.0.1 unless --host says otherwise, and (on loopback) answers only requests whose
  Host header names it, so a web page elsewhere cannot reach it through DNS rebinding;
- it serves files only from inside PATH (after resolving symlinks and `..`) and its own assets;
- every text from the run reaches the page as JSON and is put in the page with textContent, under
  a Content-Security-Policy that allows no inline script;
- the one write action (opt-out) needs the token this server put in the page, a JSON body and a
  same-origin request: another site's page can neither read the token nor send the request.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import secrets
import socket
import threading
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from facedata.core.errors import UserError
from facedata.explore.catalog import FACETS, HIDDEN_STATUSES, Catalog
from facedata.explore.images import ShardImages
from facedata.core.run_layout import RunLayout

log = logging.getLogger("facedata.explore")

STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
TOKEN_HEADER = "x-explore-token"


def check_explore_path(path: Path) -> Path:
    """PATH as a run directory, or a one-line UserError saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder (give a run directory, e.g. runs/demo/run)")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (give a run directory, e.g. runs/demo/run)")
    if (path / "data").is_dir() and not RunLayout(path).step_dir("download").is_dir():
        raise UserError(f"{path}: a published dataset; explore reads run directories (the run it was published from)")
    if not RunLayout(path).step_dir("download").is_dir():
        raise UserError(f"{path}: not a run directory (no {RunLayout(path).step_dir('download').name}/ folder)")
    return path


def default_cache_dir(run_root: Path) -> Path:
    return Path(run_root) / ".explore"


def configured_optout_gallery(run_root: Path) -> Path | None:
    """The opt-out gallery the run's config names (identity.optout_gallery), if any."""
    try:
        config = yaml.safe_load(RunLayout(run_root).config_file.read_text()) or {}
    except FileNotFoundError:
        return None
    gallery = (config.get("identity") or {}).get("optout_gallery")
    return Path(gallery).expanduser() if gallery else None


def _json(data, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> JSONResponse:
    return _json({"error": message}, status)


def _filters(request: Request) -> dict[str, list[str]]:
    """`f=facet:value` query parameters (repeatable) -> facet -> values."""
    filters: dict[str, list[str]] = {}
    for item in request.query_params.getlist("f"):
        facet, sep, value = item.partition(":")
        if sep and facet in FACETS:
            filters.setdefault(facet, []).append(value)
    return filters


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


class ExploreApp:
    """The server's state: the run, its catalog, images, the page token and the opt-out gallery."""

    def __init__(self, run_root: Path, cache_dir: Path | None = None, optout_gallery: Path | None = None,
                 checkpoint: Path | None = None, allowed_hosts: set[str] | None = None):
        self.root = Path(run_root).resolve()
        self.layout = RunLayout(self.root)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(self.root)
        self.catalog = Catalog(self.root, self.cache_dir)
        self.images = ShardImages(self.root, self.cache_dir)
        self.optout_gallery = optout_gallery or configured_optout_gallery(self.root)
        self.token = secrets.token_urlsafe(32)
        self.allowed_hosts = allowed_hosts  # None: any Host header (bound to a non-loopback address)
        self.flip = None
        if checkpoint is not None:
            from facedata.explore.flip_search import FaceSearch

            self.flip = FaceSearch(checkpoint, self.root, self.catalog, self.images, self.cache_dir)
        self._write_lock = threading.Lock()
        self.app = Starlette(routes=self.routes(), middleware=[Middleware(_Guard, explore=self)])

    def routes(self) -> list[Route]:
        return [
            Route("/", self.index), Route("/static/{name}", self.static),
            Route("/api/info", self.info), Route("/api/funnel", self.funnel), Route("/api/facets", self.facets),
            Route("/api/samples", self.samples), Route("/api/sample/{key}", self.sample),
            Route("/api/thumb/{key}", self.thumb), Route("/api/image/{key}", self.image),
            Route("/api/identities", self.identities), Route("/api/identity/{identity_id:int}", self.identity),
            Route("/api/optout", self.optout, methods=["POST"]),
            Route("/api/face_search", self.face_search), Route("/api/similar/{key}", self.similar),
            Route("/files/{path:path}", self.files),
        ]

    # --- page and assets
    async def index(self, request: Request) -> Response:
        html = resources.files("facedata.explore").joinpath("static/index.html").read_text()
        # The token is URL-safe base64: nothing in it can end the attribute.
        html = html.replace("__EXPLORE_TOKEN__", self.token)
        return Response(html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return PlainTextResponse("not found", 404)
        data = resources.files("facedata.explore").joinpath(f"static/{name}").read_bytes()
        return Response(data, media_type=STATIC_FILES[name])

    async def files(self, request: Request) -> Response:
        """A file of the run (e.g. identity/gallery.png), only from inside PATH."""
        relative = request.path_params["path"]
        if "\x00" in relative or relative.startswith(("/", "\\")) or ":" in relative:
            return PlainTextResponse("forbidden", 403)
        target = (self.root / relative).resolve()
        if not target.is_relative_to(self.root) or target == self.root:
            return PlainTextResponse("forbidden", 403)
        if not target.is_file():
            return PlainTextResponse("not found", 404)
        return FileResponse(target)

    # --- data
    async def info(self, request: Request) -> Response:
        return _json({"run": str(self.root), "name": self.root.name, "facets": list(FACETS),
                      "hidden_statuses": sorted(HIDDEN_STATUSES), "face_search": self.flip is not None,
                      "optout_gallery": str(self.optout_gallery) if self.optout_gallery else None,
                      "files": [p for p in ("identity/gallery.png", "contact_sheet.png", "captions_sheet.png")
                                if (self.root / p).is_file()]})

    async def funnel(self, request: Request) -> Response:
        return _json(self.catalog.funnel())

    async def facets(self, request: Request) -> Response:
        return _json(self.catalog.facets(_filters(request), request.query_params.get("q")))

    async def samples(self, request: Request) -> Response:
        q = request.query_params
        return _json(self.catalog.samples(_filters(request), q.get("q"), _int(q.get("page"), 0),
                                          _int(q.get("page_size"), 48)))

    def _shown_row(self, key: str) -> tuple[dict | None, JSONResponse | None]:
        row = self.catalog.sample_row(key)
        if row is None:
            return None, _error(404, "no such sample")
        if row["status"] in HIDDEN_STATUSES:
            return None, _error(403, f"hidden: status {row['status']} is never shown")
        return row, None

    async def sample(self, request: Request) -> Response:
        row, error = self._shown_row(request.path_params["key"])
        if error:
            return error
        shard = self.catalog.shards[row["shard"]]
        records = pq.read_table(shard.file, filters=[("key", "==", row["key"])]).to_pylist()
        record = records[0] if records else {}
        stages = []
        reached = True
        for stage in self.catalog.stage_order():
            if stage == "other" and row["stage"] != "other":
                continue
            if not reached:
                stages.append({"stage": stage, "status": "not reached"})
            elif row["stage"] == stage:
                stages.append({"stage": stage, "status": row["status"]})
                reached = False
            else:
                stages.append({"stage": stage, "status": "ok"})
        faces = record.get("faces") or []
        face_ids = record.get("face_identity_ids") or []
        embedded = [i for i, f in enumerate(faces) if f.get("embedding_index") is not None]
        attributes = {a["face"]: a for a in (record.get("face_attributes") or [])}
        out_faces = []
        for i, face in enumerate(faces):
            identity = face_ids[embedded.index(i)] if i in embedded and embedded.index(i) < len(face_ids) else None
            attrs = attributes.get(i)
            out_faces.append({
                "index": i, "bbox": face.get("bbox"), "kps": face.get("kps"), "score": face.get("score"),
                "yaw": face.get("yaw"), "pitch": face.get("pitch"), "roll": face.get("roll"),
                "sharpness": face.get("sharpness"), "primary": face.get("primary"), "identity_id": identity,
                "embedded": face.get("embedding_index") is not None,
                "attributes": [{"name": name, "value": (attrs["values"] or {}).get(name),
                                "confidence": (attrs["confidences"] or {}).get(name)}
                               for name in (attrs["confidences"] or {})] if attrs else None,
            })
        step_columns = {k: v for k, v in record.items() if k.endswith("_status") or k == "status"}
        return _json({
            "key": row["key"], "shard": row["shard"], "url": row["url"], "path": row["path"],
            "license": record.get("license"), "caption": row["caption"], "face_caption": row["face_caption"],
            "status": row["status"], "stage": row["stage"], "reason_value": row["reason_value"],
            "error": row["error"], "split": row["split"], "identity_id": row["identity_id"],
            "identity_outlier": row["identity_outlier"], "identity_centre_sim": row["identity_centre_sim"],
            "width": record.get("width"), "height": record.get("height"), "has_image": row["ext"] is not None,
            "stages": stages, "step_statuses": step_columns, "faces": out_faces,
            "optout_possible": self.optout_gallery is not None,
        })

    async def thumb(self, request: Request) -> Response:
        row, error = self._shown_row(request.path_params["key"])
        if error:
            return error
        data = self.images.thumbnail(row["shard"], row["key"])
        if data is None:
            return _error(404, "no stored image for this sample")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def image(self, request: Request) -> Response:
        row, error = self._shown_row(request.path_params["key"])
        if error:
            return error
        found = self.images.image(row["shard"], row["key"])
        if found is None:
            return _error(404, "no stored image for this sample")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "private, max-age=3600"})

    async def identities(self, request: Request) -> Response:
        q = request.query_params
        return _json(self.catalog.identities(_int(q.get("page"), 0), _int(q.get("page_size"), 60)))

    async def identity(self, request: Request) -> Response:
        return _json(self.catalog.identity(request.path_params["identity_id"]))

    async def face_search(self, request: Request) -> Response:
        if self.flip is None:
            return _error(404, "text-to-face search needs --checkpoint")
        query = (request.query_params.get("q") or "").strip()
        if not query:
            return _error(400, "empty query")
        return _json({"query": query, "rows": self.flip.text_search(query, _int(request.query_params.get("k"), 24))})

    async def similar(self, request: Request) -> Response:
        if self.flip is None:
            return _error(404, "more like this needs --checkpoint")
        row, error = self._shown_row(request.path_params["key"])
        if error:
            return error
        return _json({"key": row["key"], "rows": self.flip.similar(row["key"], _int(request.query_params.get("k"), 24))})

    # --- the one write action
    async def optout(self, request: Request) -> Response:
        sent = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(sent.encode(), self.token.encode()):
            return _error(403, "missing or wrong page token")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "expected a JSON body")
        if self.optout_gallery is None:
            return _error(409, "no opt-out gallery: set identity.optout_gallery in the run's config or pass --optout-gallery")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "expected a JSON object")
        vectors, what = self._optout_vectors(body)
        if isinstance(vectors, JSONResponse):
            return vectors
        with self._write_lock:
            self.optout_gallery.mkdir(parents=True, exist_ok=True)
            target = self.optout_gallery / f"explore-{what}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}.npy"
            buffer = io.BytesIO()
            np.save(buffer, vectors.astype(np.float32))
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(target)
        log.info("explore: opted out %s: %d embeddings -> %s", what, len(vectors), target)
        return _json({"written": str(target), "embeddings": int(len(vectors)),
                      "note": "the next run of this config removes images matching them (optout_match)"})

    def _optout_vectors(self, body: dict):
        """The embeddings to opt out: every primary face of an identity, or one face of a sample."""
        pairs: list[tuple[int, int]] = []
        if isinstance(body.get("identity_id"), int):
            what = f"identity-{body['identity_id']}"
            pairs = self.catalog.primary_embeddings_of(body["identity_id"])
        elif isinstance(body.get("key"), str) and isinstance(body.get("face"), int):
            row = self.catalog.sample_row(body["key"])
            if row is None:
                return _error(404, "no such sample"), None
            records = pq.read_table(self.catalog.shards[row["shard"]].file, columns=["key", "faces"],
                                    filters=[("key", "==", row["key"])]).to_pylist()
            faces = (records[0]["faces"] or []) if records else []
            if not 0 <= body["face"] < len(faces) or faces[body["face"]]["embedding_index"] is None:
                return _error(404, "no embedded face with that index"), None
            what = f"face-{row['key']}-{body['face']}"
            pairs = [(row["shard"], faces[body["face"]]["embedding_index"])]
        else:
            return _error(400, "expected {identity_id} or {key, face}"), None
        if not pairs:
            return _error(404, "no embedded faces found"), None
        vectors = []
        for shard_id, row_index in pairs:
            emb = np.load(self.layout.shard_file("faces", shard_id, "embeddings.npy"), mmap_mode="r")
            vectors.append(np.asarray(emb[row_index], np.float32))
        return np.stack(vectors), what


class _Guard:
    """Security headers on every answer; Host checked on loopback; the write route's origin checked."""

    def __init__(self, app, explore: ExploreApp):
        self.app = app
        self.explore = explore

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        allowed = self.explore.allowed_hosts
        if allowed is not None and headers.get("host") not in allowed:
            return await PlainTextResponse("unknown host", 421)(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD"):
            origin = headers.get("origin")
            own = f"http://{headers.get('host')}"
            if (origin is not None and origin != own) or headers.get("sec-fetch-site", "same-origin") != "same-origin":
                return await PlainTextResponse("cross-origin request refused", 403)(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                         (b"cross-origin-resource-policy", b"same-origin")]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def serve(path: Path, host: str = "127.0.0.1", port: int = 8765, checkpoint: Path | None = None,
          cache_dir: Path | None = None, optout_gallery: Path | None = None, ready=print) -> None:
    """Check PATH, build or reuse the sample table, bind, print the URL and serve until Ctrl-C."""
    import uvicorn

    root = check_explore_path(path)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    # Listening before the URL is printed: a request sent at once waits in the backlog instead of
    # being refused while the server starts.
    sock.listen(128)
    bound_port = sock.getsockname()[1]
    loopback = host in ("127.0.0.1", "localhost", "::1")
    allowed = {f"{h}:{bound_port}" for h in ("127.0.0.1", "localhost", "[::1]")} if loopback else None
    explore = ExploreApp(root, cache_dir=cache_dir, optout_gallery=optout_gallery, checkpoint=checkpoint,
                         allowed_hosts=allowed)
    shown_host = f"[{host}]" if ":" in host else host
    ready(f"facedata explore: http://{shown_host}:{bound_port}/  ({root}; Ctrl-C to stop)")
    config = uvicorn.Config(explore.app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
