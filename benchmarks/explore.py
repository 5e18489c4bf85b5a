"""`facedata explore` on a synthetic run of 1,000,000 rows: first page, combined facets, memory.

The run is generated, not curated: rows with statuses in realistic shares (a user step's `unsafe`
among them), 1-3 faces with boxes and landmarks, attributes with confidences, identities, splits
and captions drawn from small vocabularies. Images are shared: each shard's tar holds real photos
(openpeople, 320 px) for its first 64 keys only, which is all a first page shows.

Measured against the real server (`facedata explore RUN --port 0` in a subprocess):
  - the sample table's build (one-off, on first start) and the start-up with it cached;
  - the first page as the page loads it (HTML, app.js, info, funnel, facets, 48 samples, 48
    thumbnails; sequential requests, so an upper bound on what the browser's parallel ones take),
    with thumbnails made cold from the tars and then cached; and in chromium, navigation to the page
    being rendered, where /usr/bin/chromium exists;
  - a combined facet query (3 facets + a text word: every facet's counts and the total) and the
    page of samples for it;
  - the server's RSS after these queries, at 100k and at 1M rows (flat in the run size).

    .venv/bin/python benchmarks/explore.py [--rows 1000000] [--out /tmp/explore-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from facedata.attributes.vocabulary import ATTRIBUTES  # noqa: E402
from facedata.core.schema import COLUMNS  # noqa: E402

ROWS_PER_SHARD = 10_000
IMAGES_PER_TAR = 64
STATUSES = {"ok": 0.62, "http_404": 0.05, "timeout": 0.02, "too_small": 0.03, "bad_aspect": 0.01, "no_face": 0.12,
            "too_many_faces": 0.02, "face_too_small": 0.03, "unsafe": 0.01, "near_duplicate": 0.03,
            "optout_match": 0.005, "identity_outlier": 0.015, "too_few_attributes": 0.03}
WORDS = ("woman man person smiling portrait beach city park studio street photo selfie wedding concert office "
         "family friends outdoor indoor sunset red blue glasses hat dress suit").split()


def _shared_images() -> list[bytes]:
    from tests.conftest import openpeople_photos

    out = []
    for path in openpeople_photos()[:16]:
        with Image.open(path) as im:
            im.thumbnail((320, 320))
            buffer = BytesIO()
            im.convert("RGB").save(buffer, "JPEG", quality=85)
            out.append(buffer.getvalue())
    return out


def _shard_records(shard_id: int, n: int, rng: np.random.Generator) -> pa.Table:
    start = shard_id * ROWS_PER_SHARD
    names = list(STATUSES)
    status = rng.choice(names, n, p=np.array(list(STATUSES.values())) / sum(STATUSES.values()))
    downloaded = ~np.isin(status, ["http_404", "timeout"])
    faced = downloaded & ~np.isin(status, ["too_small", "bad_aspect", "no_face"])
    n_faces = np.where(faced, rng.choice([1, 1, 1, 2, 3], n), 0)
    n_faces[status == "too_many_faces"] = 6
    identity = rng.integers(0, 50_000, n)
    split = rng.choice(["train", "validation", "test"], n, p=[0.8, 0.1, 0.1])
    kept_identity = faced & ~np.isin(status, ["too_many_faces", "face_too_small", "unsafe"])
    rows = []
    for i in range(n):
        words = rng.choice(WORDS, 6)
        faces, attrs = [], []
        for f in range(int(n_faces[i])):
            x, y, s = 40.0 + 60 * f, 50.0, 80.0
            faces.append({"bbox": [x, y, x + s, y + s], "kps": [x + 25, y + 30, x + 55, y + 30, x + 40, y + 45,
                                                                 x + 28, y + 62, x + 52, y + 62],
                          "score": 0.9, "side": s, "area_ratio": 0.05, "yaw": 5.0, "pitch": 0.0, "roll": 0.0,
                          "sharpness": 120.0, "primary": f == 0, "embedding_index": None})
            values, confidences = {}, {}
            for name, spec in ATTRIBUTES.items():
                confidences[name] = float(rng.uniform(0.5, 1.0))
                sure = confidences[name] > 0.7
                if spec.kind == "category":
                    values[name] = str(rng.choice(spec.values)) if sure else None
                elif spec.kind == "bool":
                    values[name] = bool(rng.random() < 0.3) if sure else None
                else:
                    values[name] = float(rng.uniform(5, 80)) if sure else None
            attrs.append({"face": f, "values": values, "confidences": confidences})
        ok = status[i] == "ok"
        rows.append({
            "key": f"{start + i:09d}", "url": f"https://images.example.org/{start + i}.jpg",
            "caption": " ".join(words), "path": None, "status": str(status[i]),
            "error": "HTTP 404" if status[i] == "http_404" else None,
            "http_status": 404 if status[i] == "http_404" else 200, "attempts": 1, "download_seconds": 0.1,
            "content_type": "image/jpeg", "bytes_downloaded": 30_000, "sha256": None, "orig_width": 320,
            "orig_height": 96 if status[i] == "bad_aspect" else (120 if status[i] == "too_small" else 320),
            "width": 320, "height": 320, "ext": "jpg" if downloaded[i] else None,
            "face_status": str(status[i]) if status[i] in ("no_face", "too_many_faces", "face_too_small") else "ok",
            "n_faces": int(n_faces[i]), "faces": faces, "primary_face": 0 if faces else None,
            "face_detector": "synthetic", "face_embedder": "synthetic",
            "safety_status": "unsafe" if status[i] == "unsafe" else "ok",
            "identity_id": int(identity[i]) if kept_identity[i] else None, "identity_size": 20,
            "identity_centre_sim": float(rng.uniform(0.2, 0.9)) if kept_identity[i] else None,
            "identity_outlier": bool(status[i] == "identity_outlier"),
            "face_identity_ids": [int(identity[i])] if kept_identity[i] else [],
            "split": str(split[i]) if kept_identity[i] else None,
            "identity_status": str(status[i]) if status[i] in ("near_duplicate", "optout_match", "identity_outlier") else "ok",
            "face_caption": (f"A {' '.join(rng.choice(WORDS, 3))} face, {values.get('hair_color') or 'dark'} hair."
                             if ok and attrs else None),
            "clip_score": None, "face_attributes": attrs or None, "n_valid_labels": 8, "caption_rewritten": False,
        })
    schema = pa.schema([(c.name, c.type) for c in COLUMNS if c.name in rows[0]] + [("safety_status", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def make_run(out: Path, n_rows: int) -> Path:
    """The synthetic run (reused when it exists with the same row count)."""
    run = out / f"run_{n_rows}"
    marker = run / "made.json"
    if marker.exists():
        return run
    images = _shared_images()
    for sub in ("shards", "captions"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    (run / "fingerprints.json").write_text(json.dumps({"order": ["download", "faces", "safety", "identity", "captions"]}))
    rng = np.random.default_rng(0)
    t0 = time.time()
    for shard_id in range((n_rows + ROWS_PER_SHARD - 1) // ROWS_PER_SHARD):
        n = min(ROWS_PER_SHARD, n_rows - shard_id * ROWS_PER_SHARD)
        table = _shard_records(shard_id, n, rng)
        pq.write_table(table, run / "captions" / f"{shard_id:05d}.parquet")
        (run / "captions" / f"{shard_id:05d}.stats.json").write_text(json.dumps({"shard_id": shard_id}))
        pq.write_table(table.select(["key", "status"]), run / "shards" / f"{shard_id:05d}.parquet")
        (run / "shards" / f"{shard_id:05d}.stats.json").write_text(json.dumps({"shard_id": shard_id}))
        with tarfile.open(run / "shards" / f"{shard_id:05d}.tar", "w") as tar:
            for i, key in enumerate(table.column("key").to_pylist()[:IMAGES_PER_TAR]):
                data = images[i % len(images)]
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(data)
                tar.addfile(info, BytesIO(data))
    marker.write_text(json.dumps({"rows": n_rows, "seconds": round(time.time() - t0, 1)}))
    return run


def _get(client, url: str) -> tuple[float, bytes]:
    # A plain new connection per request (as a browser's parallel ones are). A reused httpx
    # connection waited ~40 ms per request (delayed ACK) and httpx.get builds an SSL context per
    # call (~40 ms): the client's costs, not the server's.
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{url}: HTTP {response.status}")
    return time.perf_counter() - t0, body


def measure(run: Path, chromium: bool) -> dict:
    import httpx
    import psutil

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result: dict = {"rows": sum(pq.ParquetFile(p).metadata.num_rows for p in (run / "captions").glob("*.parquet"))}
    for attempt in ("build", "cached"):
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "facedata.cli", "explore", str(run), "--port", "0"],
                                env=env, stdout=subprocess.PIPE, text=True)
        url = proc.stdout.readline().split()[2]
        result[f"start_{attempt}_s"] = round(time.perf_counter() - t0, 2)
        if attempt == "build":
            proc.terminate()
            proc.wait()
    try:
        with httpx.Client(timeout=60) as client:
            def first_page() -> float:
                total = 0.0
                for path in ("", "static/app.js", "static/style.css", "api/info", "api/funnel", "api/facets",
                             "api/samples?page=0&page_size=48"):
                    seconds, body = _get(client, url + path)
                    total += seconds
                rows = json.loads(body)["rows"]
                for row in rows:
                    total += _get(client, f"{url}api/thumb/{row['key']}")[0]
                return total

            result["first_page_cold_thumbs_s"] = round(first_page(), 3)
            result["first_page_warm_s"] = round(statistics.median(first_page() for _ in range(3)), 3)
            facets_only = "f=gender:female&f=split:train&f=expression:happy"
            result["combined_facets_no_text_ms"] = round(1000 * statistics.median(
                _get(client, f"{url}api/facets?{facets_only}")[0] for _ in range(5)), 1)
            combined = facets_only + "&q=smiling"
            facet_times = [_get(client, f"{url}api/facets?{combined}")[0] for _ in range(5)]
            sample_times = [_get(client, f"{url}api/samples?{combined}&page=0&page_size=48")[0] for _ in range(5)]
            facets = json.loads(_get(client, f"{url}api/facets?{combined}")[1])
            result["combined_facets_with_text_ms"] = round(1000 * statistics.median(facet_times), 1)
            result["combined_samples_page_ms"] = round(1000 * statistics.median(sample_times), 1)
            result["combined_matches"] = facets["total"]
            result["funnel_ms"] = round(1000 * statistics.median(_get(client, url + "api/funnel")[0] for _ in range(5)), 1)
            result["identities_ms"] = round(1000 * _get(client, url + "api/identities?page=0")[0], 1)
        if chromium and Path("/usr/bin/chromium").exists():
            from playwright.sync_api import sync_playwright

            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                times = []
                for _ in range(3):
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    t0 = time.perf_counter()
                    page.goto(url)
                    page.wait_for_selector("body[data-ready] [data-testid=card] img")
                    # (wait_for_function evaluates a string: the page's CSP forbids that; poll instead)
                    # Lazy images below the fold never load: wait for those in the first screen.
                    deadline = time.perf_counter() + 30
                    while not page.evaluate("[...document.images].filter(i => i.getBoundingClientRect().top < "
                                            "innerHeight).every(i => i.complete && i.naturalWidth > 0)"):
                        if time.perf_counter() > deadline:
                            raise RuntimeError("the first screen's images did not load in 30 s")
                        time.sleep(0.005)
                    times.append(time.perf_counter() - t0)
                    page.close()
                browser.close()
            result["browser_first_page_s"] = [round(t, 3) for t in times]
        result["server_rss_mib"] = round(psutil.Process(proc.pid).memory_info().rss / 2**20)
    finally:
        proc.terminate()
        proc.wait()
    result["cache_mib"] = round(sum(p.stat().st_size for p in (run / ".explore").rglob("*") if p.is_file()) / 2**20, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--out", type=Path, default=Path("/tmp/explore-bench"))
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    for n_rows in args.rows:
        t0 = time.time()
        run = make_run(args.out, n_rows)
        print(f"# {n_rows:,} rows: run ready in {time.time() - t0:.0f} s ({run})", flush=True)
        print(json.dumps(measure(run, not args.no_browser)), flush=True)


if __name__ == "__main__":
    main()
