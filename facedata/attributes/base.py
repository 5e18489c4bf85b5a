"""What every attribute predictor takes and gives, and the vocabulary of attributes.

A predictor is a small class with `info` (its model's name, version, licence and source, recorded
in every output) and `predict(faces)`: a batch of faces in, for each face a dict from attribute
name to a `Prediction` (value and confidence 0..1) out. A predictor leaves out what it cannot see
(a face too small for it, a part hidden); the stage drops predictions below their confidence
threshold, so nothing is ever guessed.

Faces come as the stored image plus the face stage's box and five keypoints: each predictor cuts
and aligns its own input from those, because each model was trained on a different crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from facedata.attributes.vocabulary import ATTRIBUTES, AttributeSpec
from facedata.faces.models import ModelInfo

__all__ = ["ATTRIBUTES", "AttributeSpec", "AttributePredictor", "FaceInput", "ModelInfo", "Prediction"]


@dataclass(frozen=True)
class FaceInput:
    image: np.ndarray  # uint8 RGB [H, W, 3]: the stored image (possibly grayscale turned RGB)
    bbox: np.ndarray  # float32 [4]: x1, y1, x2, y2 in the image's pixels
    kps: np.ndarray  # float32 [5, 2]: left eye, right eye, nose, left mouth, right mouth (image left/right)


@dataclass(frozen=True)
class Prediction:
    value: str | float | bool
    confidence: float  # 0..1: the model's probability for `value` (or a calibrated score)


class AttributePredictor(Protocol):
    info: ModelInfo
    attributes: tuple[str, ...]  # the names it can produce, all in ATTRIBUTES

    def predict(self, faces: list[FaceInput]) -> list[dict[str, Prediction]]: ...
