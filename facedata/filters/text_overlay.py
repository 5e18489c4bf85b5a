"""Text overlay and banners (a watermark proxy): the share of the image that text covers, from the
PP-OCRv4 text detector `rapidocr-onnxruntime` ships (Apache-2.0). Detection only: no recognition,
the text is never read."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from facedata.core import records
from facedata.filters._images import decode_rgb, package_version
from facedata.core.packages import package_dir
from facedata.core.step import ShardStep, StepOutput


@functools.lru_cache(maxsize=4)
def detector(box_threshold: float):
    from rapidocr_onnxruntime.ch_ppocr_det import TextDetector

    return TextDetector({
        "model_path": str(package_dir("rapidocr_onnxruntime") / "models" / "ch_PP-OCRv4_det_infer.onnx"),
        "use_cuda": False, "use_dml": False,
        # One thread per call: the pipeline runs one shard per core.
        "intra_op_num_threads": 1, "inter_op_num_threads": 1,
        # "max": the detector keeps the size it is given (it only rounds to multiples of 32); the
        # image is shrunk beforehand to the step's det_side.
        "limit_side_len": 960, "limit_type": "max",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
        # RapidOCR's defaults, but for the box threshold, which is the step's option.
        "thresh": 0.3, "box_thresh": box_threshold, "max_candidates": 1000, "unclip_ratio": 1.6,
        "use_dilation": True, "score_mode": "fast",
    })


def text_boxes(data: bytes, det_side: int = 448, box_threshold: float = 0.5,
               min_box_aspect: float = 2.0) -> tuple[list[np.ndarray], tuple[int, int]]:
    """The detected text boxes (4 x 2 corner arrays, in the shrunk image's pixels) that are elongated
    enough to be a line of text, and that image's (height, width). The detector also fires on a face
    seen close up (eyebrows, eyes and mouth as three "lines"), as one near-square box over the face:
    a line of three or more characters is at least twice as long as it is tall."""
    image = np.asarray(decode_rgb(data, det_side))[:, :, ::-1].copy()  # the detector takes BGR
    boxes, _ = detector(box_threshold)(image)
    kept = []
    for box in [] if boxes is None else boxes:
        width = np.linalg.norm(box[1] - box[0])
        height = np.linalg.norm(box[3] - box[0])
        if max(width, height) >= min_box_aspect * max(1.0, min(width, height)):
            kept.append(box)
    return kept, image.shape[:2]


def text_area(data: bytes, det_side: int = 448, box_threshold: float = 0.5, min_box_aspect: float = 2.0) -> float:
    """The share of the image (0-1) inside detected text boxes (their union)."""
    import cv2

    boxes, shape = text_boxes(data, det_side, box_threshold, min_box_aspect)
    if not boxes:
        return 0.0
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(b).astype(np.int32) for b in boxes], 1)
    return float(mask.mean())


class TextOverlay(ShardStep):
    """Drops images where text covers more than `max_text_area` of the image (banners, captions
    burnt in, memes, heavy watermarks, screenshots); `text_area` is kept as a column."""

    name = "text_overlay"
    version = 1
    needs_images = True
    reasons = {"text_overlay": "text boxes cover more than max_text_area of the image"}
    columns = {"text_area": pa.float32()}

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        # Measured at det_side 448 on the project's people photos: photos without text 0-0.026
        # (players.jpg has shirt lettering), openpeople's emotion and character sheets, which carry
        # printed labels, 0.047-0.08, the photos with a text banner over their bottom fifth 0.076 or
        # more (the boxes hug the text, not the banner).
        max_text_area: float = Field(0.05, ge=0.0, le=1.0)
        # Longer side the detector sees. 448: 45 ms per image on one core; 640: 200 ms (the
        # detector's cost grows faster than the pixel count), for text under ~1% of the side.
        det_side: int = Field(448, ge=64, le=2048)
        box_threshold: float = Field(0.5, gt=0.0, lt=1.0)
        # Boxes less elongated than this are not text lines (see text_boxes): 1 counts every box.
        min_box_aspect: float = Field(2.0, ge=1.0)

    def models(self) -> dict[str, dict]:
        return {"text_detector": {"name": "PP-OCRv4 text detection (ch_PP-OCRv4_det_infer.onnx)",
                                  "version": package_version("rapidocr-onnxruntime"), "licence": "Apache-2.0",
                                  "source": "rapidocr-onnxruntime package"}}

    def process(self, rows: list[dict], images: Callable[[], Iterator[tuple[str, bytes]]] | None) -> StepOutput:
        position = {row["key"]: i for i, row in enumerate(rows) if row["status"] == records.OK}
        out = StepOutput(columns={"text_area": [None] * len(rows)}, reasons=[None] * len(rows))
        for key, data in images() if images is not None else ():
            i = position.get(key)
            if i is None:
                continue
            try:
                o = self.options
                area = text_area(data, o.det_side, o.box_threshold, o.min_box_aspect)
            except Exception:  # noqa: BLE001 - an undecodable image has no text to find; later steps drop it
                continue
            out.columns["text_area"][i] = area
            if area > self.options.max_text_area:
                out.reasons[i] = "text_overlay"
        return out
