"""The download stage: one shard plan in, one shard (tar + parquet + stats) out.

For each sample: take its embedded bytes, read its local file, or download its URL; then decode,
normalise and filter the image. Every sample leaves with a status; nothing here raises for bad input.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pyarrow as pa

from facedata.core import records
from facedata.core.config import Config
from facedata.download.downloader import Downloader
from facedata.download.imaging import process_image
from facedata.core.schema import COLUMNS
from facedata.core.schema import reasons as schema_reasons
from facedata.core.shards import ImageTar
from facedata.core.step import Shard, ShardStep, StepOutput

log = logging.getLogger(__name__)

# Columns every output record has, in this order; the plan's extra columns follow.
RECORD_FIELDS = tuple(c.name for c in COLUMNS if c.step in ("input", "download"))
# Plan columns that are consumed here rather than carried into the records.
_CONSUMED = {"image"}


def _fetch_bytes(sample: dict, downloader: Downloader, result: dict) -> bytes | None:
    """The sample's image bytes from wherever it lives; on failure set its status and return None."""
    if sample.get("image") is not None:
        return sample["image"]
    if sample.get("path"):
        try:
            return Path(sample["path"]).read_bytes()
        except OSError as err:
            result.update(status=records.FILE_NOT_FOUND, error=f"{sample['path']}: {err.strerror}")
            return None
    fetched = downloader.fetch(sample["url"])
    result.update(
        http_status=fetched.http_status,
        attempts=fetched.attempts,
        download_seconds=round(fetched.seconds, 4),
        content_type=fetched.content_type,
    )
    if fetched.status != records.OK:
        result.update(status=fetched.status, error=fetched.error)
        return None
    return fetched.data


def process_sample(sample: dict, downloader: Downloader, cfg: Config) -> tuple[dict, bytes | None]:
    """One sample end to end: (its record, the bytes to store or None)."""
    result = dict.fromkeys(RECORD_FIELDS)
    result.update({k: v for k, v in sample.items() if k not in _CONSUMED})
    if sample.get("status") not in (None, records.OK):  # an input problem, or a step before download dropped it
        return result, None
    data = _fetch_bytes(sample, downloader, result)
    if data is None:
        return result, None
    image = process_image(data, cfg.image)
    result.update(
        status=image.status,
        error=image.error,
        bytes_downloaded=len(data),
        sha256=image.sha256,
        orig_width=image.orig_width,
        orig_height=image.orig_height,
        width=image.width,
        height=image.height,
        ext=image.ext,
    )
    return result, image.data


class DownloadStep(ShardStep):
    """Fetch, decode and filter one planned shard's images: the records (RECORD_FIELDS, then the
    plan's extra columns, sorted by key) and the kept images' tar (ImageTar)."""

    name = "download"
    reasons = schema_reasons("input", "download", "image")
    status_column = None  # every record's `status` is the download's verdict (or an input problem)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run(self, shard: Shard) -> StepOutput:
        cfg = self.cfg
        samples = shard.rows
        tar = ImageTar(shard.file("tar"))
        results: list[dict] = []
        started = time.perf_counter()
        # Bound the samples in flight so memory stays flat however large the shard is.
        max_in_flight = 4 * cfg.download.concurrency
        try:
            with Downloader(cfg.download) as downloader, ThreadPoolExecutor(cfg.download.concurrency) as pool, \
                    shard.progress_bar(len(samples)) as bar:
                pending = set()
                queue = iter(samples)
                while True:
                    for sample in queue:
                        pending.add(pool.submit(process_sample, sample, downloader, cfg))
                        if len(pending) >= max_in_flight:
                            break
                    if not pending:
                        break
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        record, image = future.result()
                        tar.add(record, image, record["ext"])
                        results.append(record)
                        bar.update()
            tar.close()
        except BaseException:
            tar.abort()
            raise
        # Sorted by key, so a rerun writes the same parquet whatever the order downloads finished in.
        rows = sorted(results, key=lambda r: r["key"])
        table = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string()),
                                                                   "status": pa.array([], pa.string())})
        return StepOutput(table=table, stats={
            "bytes_downloaded": sum(r.get("bytes_downloaded") or 0 for r in rows),
            "bytes_stored": shard.file("tar").stat().st_size,
            "process_seconds": round(time.perf_counter() - started, 3),
        })
