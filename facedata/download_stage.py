"""The download stage: one shard plan in, one shard (tar + parquet + stats) out.

For each sample: take its embedded bytes, read its local file, or download its URL; then decode,
normalise and filter the image. Every sample leaves with a status; nothing here raises for bad input.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pyarrow.parquet as pq

from facedata import records
from facedata.config import Config
from facedata.downloader import Downloader
from facedata.imaging import process_image
from facedata.progress import progress_bar
from facedata.reader import ShardPlan
from facedata.fingerprints import Fingerprint, reusable, step_fingerprints
from facedata.run_layout import RunLayout
from facedata.schema import COLUMNS
from facedata.shards import ShardWriter

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
    if sample.get("status"):  # an input problem found while ingesting
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


def run_download_shard(plan: ShardPlan, cfg: Config, run_dir: Path, progress: bool = True,
                       fingerprint: Fingerprint | None = None) -> dict:
    """Process one planned shard, unless it is already done under the same settings (`fingerprint`,
    by default the config's); returns the shard's stats."""
    layout = RunLayout(run_dir)
    shard_dir = layout.step_dir("download")
    fingerprint = fingerprint or step_fingerprints(cfg, models={})["download"]
    done = reusable(layout.stats_file("download", plan.shard_id), fingerprint, f"shard {plan.shard_id:05d}")
    if done is not None:
        log.info("shard %05d already done, skipped", plan.shard_id)
        return done
    samples = pq.read_table(plan.path).to_pylist()
    writer = ShardWriter(shard_dir, plan.shard_id)
    started = time.perf_counter()
    # Bound the samples in flight so memory stays flat however large the shard is.
    max_in_flight = 4 * cfg.download.concurrency
    try:
        with Downloader(cfg.download) as downloader, ThreadPoolExecutor(cfg.download.concurrency) as pool, progress_bar(
            total=len(samples), desc=f"shard {plan.shard_id:05d}", unit="img", progress=progress, leave=False
        ) as bar:
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
                    writer.add(record, image, record["ext"])
                    bar.update()
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - started
    stats = writer.close({"process_seconds": round(seconds, 3), "fingerprint": fingerprint.as_dict()})
    log.info(
        "shard %05d: %d/%d ok in %.1f s (%s)",
        plan.shard_id, stats["n_ok"], stats["n_samples"], seconds,
        ", ".join(f"{k}={v}" for k, v in stats["status_counts"].items()),
    )
    return stats
