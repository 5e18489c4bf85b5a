"""The face stage: one finished download shard in, the same records with face columns out.

Reads `RUN/shards/NNNNN.parquet` and the images of its kept samples from `NNNNN.tar`, finds and
embeds the faces, applies the face-presence filter and writes, each atomically, in this order:

- `RUN/faces/NNNNN.crops.tar` (faces.save_crops only): the embedded faces' aligned 112x112
  crops, `KEY_FACEIDX.jpg`;
- `RUN/faces/NNNNN.embeddings.npy`: float16 [embedded faces, D], unit-norm rows, in record order
  then face order; a face's row is its `embedding_index`;
- `RUN/faces/NNNNN.parquet`: every record of the shard, with the face columns added;
- `RUN/faces/NNNNN.stats.json`: counts, models and timings. Written last: it marks the shard done.

Rows that were not ok after the download stage pass through with empty face columns. An image
the filter drops changes `status` from ok to the reason (no_face, face_too_small, ...), which is
also kept in `face_status`, so the run's funnel can say which stage dropped what. Every face
scoring at least min_score is listed with its box, keypoints, pose and sharpness; the faces that
count (at least min_face_side) of the images the filter keeps are also embedded. Embedding is the
costliest step per face (~11 ms on one core, against ~9 ms to detect a whole image), so nothing
is spent on the faces of dropped images, e.g. a crowd over max_faces.

Speed. The detector sees at most det_size pixels a side, so decoding more is mostly waste: JPEGs
are decoded at a reduced scale (Pillow's draft mode: the decoder itself skips the detail) whose
longer side is still at least det_size, and boxes are scaled back to the stored image's pixels.
Embedding crops come from the same decode unless it shows a face well under the crop's 112 px
while the original has more: then from a finer decode, so a small face in a large image is not
embedded from a blurred copy (on insightface's group photo upscaled to 6000 px, where the faces
decode at ~60 px, cosine similarity to the full-size embeddings rises from 0.984 to 0.995). On the
openpeople photos (2048-2752 px), decoding at 1x det_size instead of full size cut CPU time per
image by ~40% and left identity separation unchanged (same-person and other-person cosine
similarities, rank-1 match): most of what differs from full-size embeddings is resampling.

Images go through the models in batches of faces.batch_size on a process-wide pool of one thread
per core (onnxruntime runs one thread per session call, see face_models), shared by every shard
in the process: shard tasks running side by side share the cores instead of stacking thread pools.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tarfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from facedata.core import records
from facedata.core.config import Config, FaceConfig, FaceFilterConfig
from facedata.faces.models import (
    CROP_SIZE,
    Face,
    FaceAnalyzer,
    align_face,
    default_threads,
    load_analyzer,
    primary_index,
    sharpness,
)
from facedata.download.imaging import ImageError, decode_rgb
from facedata.core.schema import step_columns
from facedata.core.schema import reasons as schema_reasons
from facedata.core.step import Shard, ShardStep, StepOutput
from facedata.core.shards import atomic_path, atomic_write_bytes, tar_images

log = logging.getLogger(__name__)

# Faces the detection decode shows at least this big are cropped from it for embedding: the crop
# (112 px) is then upsampled by at most 1.25x. On the openpeople full-length shots (~100 px there)
# a finer decode moved embeddings no more than resampling does, and costs a full decode each.
_MIN_DECODED_FACE = 90

# Columns the face step adds, with their types (null for rows it did not analyse).
FACE_COLUMNS = step_columns("faces")



# ---------------------------------------------------------------------------------------------
# Decoding and analysing images


def decode_for_faces(
    data: bytes, max_pixels: int, max_side: int, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """(RGB array, the image's full (width, height)): the image decoded so its longer side is at
    least `max_side` and under twice that, when it is larger.

    With `size` known (a stored record's), a JPEG decodes straight at the reduced scale; other
    formats, and files of unknown size, decode in full and are box-reduced by a whole factor.
    """
    draft = None
    if size and max(size) > max_side:
        scale = max_side / max(size)
        draft = (math.ceil(size[0] * scale), math.ceil(size[1] * scale))
    img = decode_rgb(data, max_pixels, draft_size=draft)
    full_size = size or img.size
    factor = max(img.size) // max_side
    if factor >= 2:
        img = img.reduce(factor)
    return np.asarray(img), full_size


def _rescaled(face: Face, sx: float, sy: float) -> Face:
    """`face` with its coordinates scaled from the decoded image to the original one."""
    bbox = face.bbox * np.array([sx, sy, sx, sy], dtype=np.float32)
    kps = face.kps * np.array([sx, sy], dtype=np.float32)
    return replace(face, bbox=bbox, kps=kps, side=float(min(bbox[2] - bbox[0], bbox[3] - bbox[1])))


@dataclass
class ImageFaces:
    """What the face stage found in one image."""

    size: tuple[int, int]  # the image's full (width, height); faces are in these pixels
    faces: list[Face]  # those scoring at least faces.filter.min_score, largest first
    primary: int | None
    status: str  # the face filter's verdict: records.OK or the reason it drops the image
    error: str | None


def stage_analyzer(face_cfg: FaceConfig) -> FaceAnalyzer:
    """The packaged or configured models, set to detect and measure only: this stage embeds faces
    itself, once the filter has said which images it keeps."""
    models = load_analyzer(face_cfg)
    return FaceAnalyzer(models.detector, models.embedder, embed_min_score=math.inf)


def _embed(analyzer: FaceAnalyzer, kept: list[tuple[ImageFaces, np.ndarray, bytes]], face_cfg: FaceConfig,
           max_pixels: int, keep_crops: bool) -> None:
    """Embed the faces that count (at least min_face_side) of the kept images, in one batch.

    Faces are cropped from the detection decode, unless it shows one under _MIN_DECODED_FACE px
    while the original has more: then the image is decoded again, finely enough for that face to
    fill the 112 px crop (or at full size)."""
    targets: list[Face] = []
    crops: list[np.ndarray] = []
    for found, image, data in kept:
        counted = [f for f in found.faces if f.side >= face_cfg.filter.min_face_side]
        if not counted:
            continue
        width, height = found.size
        smallest = min(f.side for f in counted)
        scale = image.shape[1] / width
        if scale < 1 and smallest * scale < _MIN_DECODED_FACE:
            needed = min(1.0, CROP_SIZE / smallest)  # of the original's resolution
            image, _ = decode_for_faces(data, max_pixels, math.ceil(max(width, height) * needed), found.size)
        to_image = np.array([image.shape[1] / width, image.shape[0] / height], dtype=np.float32)
        for face in counted:
            targets.append(face)
            crops.append(align_face(image, face.kps * to_image))
    if not crops:
        return
    for face, crop, vector in zip(targets, crops, analyzer.embedder.embed(np.stack(crops))):
        face.embedding = vector
        face.sharpness = sharpness(crop)  # measured on the crop the embedding saw
        face.crop = crop if keep_crops else None


def analyze_encoded(
    analyzer: FaceAnalyzer,
    images: list[tuple[bytes, tuple[int, int] | None]],
    face_cfg: FaceConfig,
    max_pixels: int,
    embed: bool = True,
    keep_crops: bool = False,
) -> list[ImageFaces | ImageError]:
    """Find, measure and filter the faces of each (encoded image, its (width, height) or None),
    and with `embed`, embed the faces that count in the images the filter keeps; an image that
    does not decode gives its ImageError. `analyzer` comes from stage_analyzer()."""
    decoded: list[tuple[np.ndarray, tuple[int, int]] | ImageError] = []
    for data, size in images:
        try:
            decoded.append(decode_for_faces(data, max_pixels, face_cfg.det_size, size))
        except ImageError as err:
            decoded.append(err)
    detected = iter(analyzer.analyze([d[0] for d in decoded if not isinstance(d, ImageError)]))
    out: list[ImageFaces | ImageError] = []
    kept: list[tuple[ImageFaces, np.ndarray, bytes]] = []
    for (data, _), result in zip(images, decoded):
        if isinstance(result, ImageError):
            out.append(result)
            continue
        image, (width, height) = result
        sx, sy = width / image.shape[1], height / image.shape[0]
        faces = [_rescaled(f, sx, sy) for f in next(detected) if f.score >= face_cfg.filter.min_score]
        primary = primary_index(faces, width, height)
        found = ImageFaces((width, height), faces, primary, *face_filter(faces, primary, face_cfg.filter))
        out.append(found)
        if found.status == records.OK:
            kept.append((found, image, data))
    if embed:
        _embed(analyzer, kept, face_cfg, max_pixels, keep_crops)
    return out


def face_filter(faces: list[Face], primary: int | None, cfg: FaceFilterConfig) -> tuple[str, str | None]:
    """(status, one-line reason) of the face-presence filter for an image's usable faces."""
    n = len(faces)
    if n < cfg.min_faces:
        status = records.NO_FACE if n == 0 else records.TOO_FEW_FACES
        return status, f"{n} faces scoring >= {cfg.min_score}, under min_faces {cfg.min_faces}"
    if cfg.max_faces is not None and n > cfg.max_faces:
        return records.TOO_MANY_FACES, f"{n} faces scoring >= {cfg.min_score}, over max_faces {cfg.max_faces}"
    if primary is None:  # min_faces is 0 and there is no face
        return records.OK, None
    face = faces[primary]
    if face.side < cfg.min_face_side:
        return records.FACE_TOO_SMALL, f"primary face {face.side:.0f} px, under min_face_side {cfg.min_face_side}"
    if face.area_ratio < cfg.min_area_ratio:
        return (
            records.FACE_RATIO_TOO_SMALL,
            f"primary face covers {face.area_ratio:.4f} of the image, under min_area_ratio {cfg.min_area_ratio}",
        )
    if abs(face.yaw) > cfg.max_abs_yaw:
        return records.FACE_POSE, f"primary face yaw {face.yaw:.0f} degrees, over max_abs_yaw {cfg.max_abs_yaw}"
    return records.OK, None


# ---------------------------------------------------------------------------------------------
# The process-wide pool that runs the models


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def face_workers() -> int:
    """Threads that run the models at once: the cores this process may use, divided by
    onnxruntime's threads per call."""
    return max(1, len(os.sched_getaffinity(0)) // default_threads())


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(face_workers(), thread_name_prefix="faces")
        return _POOL


# ---------------------------------------------------------------------------------------------
# The shard


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _CropWriter:
    """Streams aligned crops into NNNNN.crops.tar as they are made, so none are held in memory."""

    def __init__(self, path: Path):
        self._target = atomic_path(path)
        self._tar = tarfile.open(self._target.__enter__(), "w", format=tarfile.PAX_FORMAT)
        self._mtime = int(time.time())

    def add(self, key: str, faces: list[Face]) -> None:
        for i, face in enumerate(faces):
            if face.crop is None:  # not embedded
                continue
            buf = io.BytesIO()
            Image.fromarray(face.crop).save(buf, "JPEG", quality=95)
            info = tarfile.TarInfo(f"{key}_{i}.jpg")
            info.size, info.mtime, info.mode = buf.tell(), self._mtime, 0o644
            buf.seek(0)
            self._tar.addfile(info, buf)

    def close(self, failed: bool = False) -> None:
        self._tar.close()
        self._target.__exit__(RuntimeError if failed else None, None, None)


def _face_row(face: Face, primary: bool, embedding_index: int | None) -> dict:
    return {
        "bbox": face.bbox.tolist(),
        "kps": face.kps.reshape(-1).tolist(),
        "score": face.score,
        "side": face.side,
        "area_ratio": face.area_ratio,
        "yaw": face.yaw,
        "pitch": face.pitch,
        "roll": face.roll,
        "sharpness": face.sharpness,
        "primary": primary,
        "embedding_index": embedding_index,
    }


def _write_embeddings(path: Path, embeddings: list[np.ndarray], dim: int) -> None:
    matrix = np.stack(embeddings) if embeddings else np.zeros((0, dim), dtype=np.float32)
    # Renormalise before rounding to float16 so each stored row is as close to unit norm as it can be.
    matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    # Through a buffer: numpy writing to a file reports a short write without its cause (on a full
    # disk, "8192 requested and 4096 written").
    buffer = io.BytesIO()
    np.save(buffer, matrix.astype(np.float16))
    atomic_write_bytes(path, buffer.getvalue())


def _analyze_shard(
    analyzer: FaceAnalyzer, tar_path: Path, wanted: dict[str, tuple[str, tuple[int, int]]], cfg: Config,
    crops: _CropWriter | None, bar,
) -> dict[str, ImageFaces | ImageError]:
    """What was found (or the decode error) in each wanted key -> (ext, size), batches running on the pool."""
    found: dict[str, ImageFaces | ImageError] = {}
    pending: deque[tuple[list[str], Future]] = deque()

    def collect(keys: list[str], future: Future) -> None:
        for key, result in zip(keys, future.result()):
            if crops is not None and isinstance(result, ImageFaces):
                crops.add(key, result.faces)
                for face in result.faces:
                    face.crop = None  # written; hold no pixels for the rest of the shard
            found[key] = result
        bar.update(len(keys))

    images = tar_images(tar_path, {key: ext for key, (ext, _) in wanted.items()})
    for batch in _batches(images, cfg.faces.batch_size):
        keys = [key for key, _ in batch]
        items = [(data, wanted[key][1]) for key, data in batch]
        pending.append((keys, _pool().submit(
            analyze_encoded, analyzer, items, cfg.faces, cfg.image.max_pixels, keep_crops=crops is not None
        )))
        # Enough batches in flight to keep every pool thread busy, few enough to bound memory.
        if len(pending) > face_workers():
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())
    return found


class FaceStep(ShardStep):
    """Find, embed and filter the faces of one shard's kept images."""

    name = "faces"
    reasons = schema_reasons("faces", "image")  # an image that fails to decode here too
    columns = FACE_COLUMNS
    status_column = "face_status"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run(self, shard: Shard) -> StepOutput:
        cfg = self.cfg
        analyzer = stage_analyzer(cfg.faces)
        rows = shard.table.select(["key", "status", "width", "height", "ext"]).to_pylist()
        wanted = {r["key"]: (r["ext"], (r["width"], r["height"])) for r in rows if r["status"] == records.OK}
        crops = _CropWriter(shard.file("crops.tar")) if cfg.faces.save_crops else None
        images_tar = shard.layout.images_tar(shard.id)
        try:
            with shard.progress_bar(len(wanted)) as bar:
                found = _analyze_shard(analyzer, images_tar, wanted, cfg, crops, bar)
            missing = sorted(set(wanted) - set(found))
            if missing:
                raise RuntimeError(f"{images_tar} lacks {len(missing)} kept images, e.g. {missing[0]}; redo the shard")
        except BaseException:
            if crops is not None:
                crops.close(failed=True)
            raise
        if crops is not None:
            crops.close()

        # The new columns in record order; embedding rows follow the same order.
        out = StepOutput(columns={c: [None] * len(rows) for c in FACE_COLUMNS if c != self.status_column},
                         reasons=[None] * len(rows))
        columns = out.columns
        embeddings: list[np.ndarray] = []
        for i, row in enumerate(rows):
            result = found.get(row["key"])
            if result is None:
                continue
            out.reasons[i] = None if result.status == records.OK else result.status
            if isinstance(result, ImageError):
                out.errors[i] = str(result)
                continue
            out.errors[i] = result.error
            faces = []
            for j, face in enumerate(result.faces):
                index = None
                if face.embedding is not None:
                    index = len(embeddings)
                    embeddings.append(face.embedding)
                faces.append(_face_row(face, j == result.primary, index))
            columns["n_faces"][i] = len(faces)
            columns["faces"][i] = faces
            columns["primary_face"][i] = result.primary
            columns["face_detector"][i] = analyzer.detector_info.name
            columns["face_embedder"][i] = analyzer.embedder_info.name
        _write_embeddings(shard.file("embeddings.npy"), embeddings, analyzer.embedding_dim)
        n_faces = sum(n or 0 for n in columns["n_faces"])
        out.stats = {
            "n_faces": n_faces,
            "n_embeddings": len(embeddings),
            "models": {"detector": analyzer.detector_info.as_dict(), "embedder": analyzer.embedder_info.as_dict()},
            "embedding_dim": analyzer.embedding_dim,
            "backend": cfg.faces.backend,
            "det_size": cfg.faces.det_size,
            "filter": cfg.faces.filter.model_dump(),
        }
        out.summary = f"{n_faces} faces"
        return out


# ---------------------------------------------------------------------------------------------
# `facedata detect`


def detect_files(paths: list[str], cfg: FaceConfig, max_pixels: int) -> Iterator[dict]:
    """One JSON-ready dict per path, in order: the faces found (scoring at least
    cfg.filter.min_score) in the file's pixels after EXIF orientation, or why it could not be read."""
    analyzer = stage_analyzer(cfg)
    for chunk in _batches(paths, cfg.batch_size):
        read: list[tuple[str, bytes]] = []
        unreadable: dict[str, str] = {}
        for path in chunk:
            try:
                read.append((path, Path(path).read_bytes()))
            except OSError as err:
                unreadable[path] = f"{type(err).__name__}: {err.strerror or err}"
        found = analyze_encoded(analyzer, [(data, None) for _, data in read], cfg, max_pixels, embed=False)
        results = dict(zip([path for path, _ in read], found))
        for path in chunk:
            result = results.get(path)
            if path in unreadable:
                yield {"path": path, "error": unreadable[path]}
            elif isinstance(result, ImageError):
                yield {"path": path, "error": f"{result.status}: {result}"}
            else:
                width, height = result.size
                yield {"path": path, "width": width, "height": height, "faces": [_face_json(f) for f in result.faces]}


def _face_json(face: Face) -> dict:
    return {
        "bbox": [round(float(v), 2) for v in face.bbox],
        "score": round(face.score, 4),
        "kps": [[round(float(x), 2), round(float(y), 2)] for x, y in face.kps],
        "pose": {"yaw": round(face.yaw, 1), "pitch": round(face.pitch, 1), "roll": round(face.roll, 1)},
    }
