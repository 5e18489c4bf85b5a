"""The caption stage: one shard's kept images in, the same records with attributes and a face
caption out.

For each image the identity stage (or, without it, the face stage) kept, the faces are described
primary first, up to `attributes.max_faces`: every configured attribute predictor runs on the
shard's faces in batches, a prediction below its confidence threshold is dropped (never guessed),
and the composer writes a caption from what is left. The web caption stays in `caption`.

Written, each atomically: `RUN/captions/NNNNN.parquet` (every record of the shard plus
face_caption, face_attributes, n_valid_labels, caption_rewritten) and `NNNNN.stats.json` last,
which marks the shard done: the models with their versions and licences, seconds per model,
how often each attribute was found, the shard's caption statistics, and a digest of the records it
captioned. When the identity stage is redone over a grown input, a shard whose records changed is
captioned again; its images described before keep their descriptions and captions (same settings).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from facedata.core import records
from facedata.attributes import load_predictors
from facedata.attributes.base import AttributePredictor, FaceInput, Prediction
from facedata.attributes.thresholds import NEVER, thresholds  # noqa: F401 - NEVER re-exported
from facedata.captions.compose import caption_stats, compose_caption, load_rewriter, rewrite_caption
from facedata.core.config import Config
from facedata.download.imaging import decode_rgb
from facedata.core.schema import reasons as schema_reasons
from facedata.core.schema import step_columns
from facedata.core.shards import tar_images
from facedata.core.step import Shard, ShardStep, StepOutput

log = logging.getLogger(__name__)

# Images are decoded at a reduced JPEG scale while the smallest described face keeps at least this
# many pixels on its shorter side: the largest model input (face parsing) needs no more.
DECODE_MIN_FACE_SIDE = 256

CAPTION_COLUMNS = step_columns("captions")



def confident(predicted: dict[str, Prediction], needed: dict[str, float]) -> dict[str, Prediction]:
    return {
        name: p for name, p in predicted.items()
        if name in needed and p.confidence >= max(needed[name], needed.get(f"{name}={p.value}", 0.0))
    }  # fmt: skip


def described_faces(faces: list[dict], primary: int | None, max_faces: int) -> list[int]:
    """The primary face, then the others largest first, up to max_faces."""
    order = sorted(range(len(faces)), key=lambda i: (i != primary, -faces[i]["side"]))
    return order[:max_faces]


def decode_faces(data: bytes, row: dict, face_ids: list[int], max_pixels: int) -> list[FaceInput]:
    """The image, decoded at the smallest JPEG scale that keeps the described faces at least
    DECODE_MIN_FACE_SIDE pixels (or whole), with boxes and keypoints scaled to match."""
    width, height = row["width"], row["height"]
    smallest = min(row["faces"][i]["side"] for i in face_ids)
    factor = max(1.0, smallest / DECODE_MIN_FACE_SIDE)
    draft = (math.ceil(width / factor), math.ceil(height / factor)) if factor >= 2 else None
    img = decode_rgb(data, max_pixels, draft_size=draft)
    sx, sy = img.width / width, img.height / height
    image = np.asarray(img)
    scale_box = np.array([sx, sy, sx, sy], np.float32)
    out = []
    for i in face_ids:
        face = row["faces"][i]
        out.append(FaceInput(
            image=image,
            bbox=np.asarray(face["bbox"], np.float32) * scale_box,
            kps=np.asarray(face["kps"], np.float32).reshape(5, 2) * np.array([sx, sy], np.float32),
        ))
    return out


def describe(predictors: list[AttributePredictor], faces: list[FaceInput], needed: dict[str, float],
             seconds: Counter) -> list[dict[str, Prediction]]:
    """Every predictor over the batch, merged per face and cut to the confident attributes.
    A predictor's time is added to `seconds` under its model's name."""
    merged: list[dict[str, Prediction]] = [{} for _ in faces]
    for predictor in predictors:
        if not needed.keys() & set(predictor.attributes):
            continue
        start = time.perf_counter()
        for face, predicted in zip(merged, predictor.predict(faces)):
            face.update(predicted)
        seconds[predictor.info.name] += time.perf_counter() - start
    return [confident(face, needed) for face in merged]


@functools.lru_cache(maxsize=2)
def _relevance_model(checkpoint: str):
    from facedata.flip.embed import load_checkpoint

    return load_checkpoint(checkpoint)


def score_relevance(cfg: Config, tar_path: Path, rows: list[dict], columns: dict[str, list], statuses: list[str],
                    kept: dict[str, int]) -> None:
    """The CLIP score of each captioned image against its text; images under relevance.min_score
    get status low_relevance (DataComp's CLIP-score filter)."""
    from facedata.flip.search import clip_scores, relevance_filter

    rcfg = cfg.relevance
    model = _relevance_model(rcfg.checkpoint)
    text_of = {key: (columns["face_caption"][i] if rcfg.text == "face_caption" else rows[i]["caption"])
               for key, i in kept.items() if statuses[i] == records.OK}
    scored = [(key, data) for key, data in tar_images(tar_path, {k: rows[kept[k]]["ext"] for k in text_of})]
    if not scored:
        return
    boxes = None
    if model.use_crops:
        boxes = [rows[kept[key]]["faces"][rows[kept[key]]["primary_face"]]["bbox"] for key, _ in scored]
    scores = clip_scores(model, [data for _, data in scored], [text_of[key] or "" for key, _ in scored], boxes=boxes)
    keep = relevance_filter(scores, rcfg.min_score)
    for (key, _), score, ok in zip(scored, scores, keep):
        columns["clip_score"][kept[key]] = float(score)
        if not ok:
            statuses[kept[key]] = records.LOW_RELEVANCE


def description_settings(cfg: Config) -> dict:
    """What a shard's descriptions and captions depend on besides its images: a shard captioned
    again under the same settings reuses the descriptions it has (see _previous_descriptions)."""
    acfg = cfg.attributes
    return {
        "thresholds": thresholds(acfg),
        "min_valid_labels": acfg.min_valid_labels,
        "max_faces": acfg.max_faces,
        "models": {type(p).__name__: p.info.as_dict() for p in load_predictors(acfg, cfg.faces)},
        "rewriter": cfg.captions.rewriter_model,
        "captions": cfg.captions.enabled,
        "caption_seed": cfg.captions.seed,
    }


def _previous_descriptions(path: Path) -> dict[str, dict]:
    """key -> the face_attributes, face_caption and caption_rewritten of the images an earlier
    captioning of this shard (under the same fingerprint) described."""
    if not path.exists():
        return {}
    table = pq.read_table(path, columns=["key", "face_attributes", "face_caption", "caption_rewritten"])
    return {row["key"]: row for row in table.to_pylist() if row["face_attributes"]}


def _face_attributes(face_ids: list[int], attributes: list[dict[str, Prediction]]) -> list[dict]:
    return [
        {
            "face": i,
            "values": {name: p.value for name, p in attrs.items()},
            "confidences": {name: p.confidence for name, p in attrs.items()},
        }
        for i, attrs in zip(face_ids, attributes)
    ]


class CaptionStep(ShardStep):
    """Describe and caption the kept faces of one shard."""

    name = "captions"
    reasons = schema_reasons("captions")
    columns = CAPTION_COLUMNS
    status_column = None  # the records' `status` says it; captions keep no column of their own

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run(self, shard: Shard) -> StepOutput:
        cfg = self.cfg
        acfg = cfg.attributes
        # The images an earlier captioning of the shard described (same settings; only the records
        # changed, e.g. identity was redone over a grown input) are not described twice.
        previous = _previous_descriptions(shard.previous) if shard.previous else {}
        predictors = load_predictors(acfg, cfg.faces)
        rewriter = load_rewriter(cfg.captions.rewriter_model) if cfg.captions.rewriter_model else None
        needed = thresholds(acfg)
        rows = shard.table.select(["key", "status", "caption", "width", "height", "ext", "faces", "primary_face",
                                   "n_faces"]).to_pylist()
        kept = {r["key"]: i for i, r in enumerate(rows) if r["status"] == records.OK and r["faces"]}

        columns: dict[str, list] = {c: [None] * len(rows) for c in CAPTION_COLUMNS}
        statuses = [r["status"] for r in rows]
        seconds: Counter = Counter()
        attribute_counts: Counter = Counter()
        n_faces_described = n_faces_new = 0
        pending: list[tuple[int, list[int], list[FaceInput]]] = []

        def record(row_index: int, described: list[dict]) -> None:
            """The row's face_attributes (primary face first) and the status they give it."""
            nonlocal n_faces_described
            n_faces_described += len(described)
            for face in described:
                attribute_counts.update(name for name, value in face["values"].items() if value is not None)
            columns["face_attributes"][row_index] = described
            columns["n_valid_labels"][row_index] = sum(v is not None for v in described[0]["values"].values())
            if columns["n_valid_labels"][row_index] < acfg.min_valid_labels:
                statuses[row_index] = records.TOO_FEW_ATTRIBUTES

        def flush() -> None:
            nonlocal n_faces_new
            faces = [face for _, _, inputs in pending for face in inputs]
            n_faces_new += len(faces)
            described = describe(predictors, faces, needed, seconds)
            at = 0
            for row_index, face_ids, inputs in pending:
                attrs = described[at : at + len(inputs)]
                at += len(inputs)
                row = rows[row_index]
                record(row_index, _face_attributes(face_ids, attrs))
                if statuses[row_index] == records.TOO_FEW_ATTRIBUTES:
                    continue
                if cfg.captions.enabled:
                    composed = compose_caption(attrs, row["n_faces"], seed=f"{cfg.captions.seed}:{row['key']}")
                    if rewriter is not None:
                        composed, columns["caption_rewritten"][row_index] = rewrite_caption(rewriter, attrs, composed)
                    columns["face_caption"][row_index] = composed
            pending.clear()

        wanted = {}
        for key, row_index in kept.items():
            before = previous.get(key)
            face_ids = described_faces(rows[row_index]["faces"], rows[row_index]["primary_face"], acfg.max_faces)
            if before is not None and [face["face"] for face in before["face_attributes"]] == face_ids:
                record(row_index, before["face_attributes"])
                columns["face_caption"][row_index] = before["face_caption"]
                columns["caption_rewritten"][row_index] = before["caption_rewritten"]
            else:
                wanted[key] = rows[row_index]["ext"]
        n_reused = len(kept) - len(wanted)

        decode_start = time.perf_counter()
        with shard.progress_bar(len(wanted)) as bar:
            n_pending_faces = 0
            for key, data in shard.images(wanted):
                row_index = kept[key]
                row = rows[row_index]
                face_ids = described_faces(row["faces"], row["primary_face"], acfg.max_faces)
                t = time.perf_counter()
                inputs = decode_faces(data, row, face_ids, cfg.image.max_pixels)
                seconds["decode"] += time.perf_counter() - t
                pending.append((row_index, face_ids, inputs))
                n_pending_faces += len(inputs)
                if n_pending_faces >= acfg.batch_size:
                    flush()
                    n_pending_faces = 0
                bar.update(1)
            if pending:
                flush()
        images_tar = shard.layout.images_tar(shard.id)
        missing = [key for key, i in kept.items() if columns["face_attributes"][i] is None]
        if missing:
            raise RuntimeError(f"{images_tar} lacks {len(missing)} kept images, e.g. {missing[0]}")
        if cfg.relevance.checkpoint:
            start = time.perf_counter()
            score_relevance(cfg, images_tar, rows, columns, statuses, kept)
            seconds["relevance"] += time.perf_counter() - start
        total_seconds = time.perf_counter() - decode_start

        captions = [c for c in columns["face_caption"] if c is not None]
        reasons = [None if row["status"] != records.OK or status == records.OK else status
                   for row, status in zip(rows, statuses)]
        return StepOutput(columns=columns, reasons=reasons, summary=(
            f"{len(kept)} images, {n_faces_described} faces described, {len(captions)} captions"), stats={
            "n_reused": n_reused,  # described in an earlier captioning of the shard, not again
            "n_faces_described": n_faces_described,
            "n_captions": len(captions),
            "attribute_counts": dict(sorted(attribute_counts.items())),
            **description_settings(cfg),
            "seconds_by_step": {k: round(v, 3) for k, v in sorted(seconds.items())},
            "faces_per_second": round(n_faces_new / total_seconds, 2) if total_seconds and n_faces_new else None,
            "caption_stats": caption_stats(captions, [columns["n_valid_labels"][i] for i in kept.values()]),
        })
