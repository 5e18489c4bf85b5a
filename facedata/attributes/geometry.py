"""Attributes measured, not predicted: head pose, sharpness, lighting and resolution of a face.

They come from the face stage's keypoints and the aligned 112x112 crop, with the same functions
the face stage uses. A measurement has no probability, so its confidence says how far it sits
from the nearest category boundary: 0.5 on the boundary, rising towards 1 over `margin` units.
That keeps a face whose yaw is 19.9 degrees from being called "frontal" with confidence 1.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from facedata.attributes.base import FaceInput, ModelInfo, Prediction
from facedata.faces.models import align_face, estimate_pose, sharpness

# Degrees. estimate_pose is good to ~10 degrees for moderate poses, hence the wide margins.
FRONTAL_MAX_YAW = 20.0
PROFILE_MIN_YAW = 55.0
PITCH_UP_DOWN = 25.0
POSE_MARGIN = 10.0
# Variance of the Laplacian on the grey aligned crop. The demo's sharp photos score 285-4244; a
# Gaussian blur of sigma 2 on them brings every face under 60.
BLURRY_BELOW = 60.0
SOFT_BELOW = 200.0
# Mean luma (0..255) of the central part of the aligned crop: forehead to chin, cheek to cheek.
DIM_BELOW = 60.0
OVEREXPOSED_ABOVE = 205.0
LUMA_MARGIN = 20.0
# Shorter side of the face box in stored pixels.
HIGH_RES_MIN = 224.0
MEDIUM_RES_MIN = 96.0


def _confidence(distance: float, margin: float) -> float:
    """0.5 at a boundary, ~0.88 at one margin, ~0.98 at two."""
    return float(1.0 / (1.0 + math.exp(-2.0 * abs(distance) / margin)))


def _band(value: float, edges: list[tuple[float, str]], last: str, margin: float) -> Prediction:
    """The label of the band `value` falls in (edges ascending: below edge -> label)."""
    for edge, label in edges:
        if value < edge:
            break
    else:
        label = last
    nearest = min(abs(value - edge) for edge, _ in edges)
    return Prediction(label, _confidence(nearest, margin))


def pose_of(yaw: float, pitch: float) -> Prediction:
    """Looking up or down wins over the left-right pose when the head is tilted more than turned."""
    if abs(pitch) >= PITCH_UP_DOWN and abs(pitch) - PITCH_UP_DOWN >= abs(yaw) - FRONTAL_MAX_YAW:
        return Prediction("looking up" if pitch > 0 else "looking down",
                          _confidence(abs(pitch) - PITCH_UP_DOWN, POSE_MARGIN))
    return _band(abs(yaw), [(FRONTAL_MAX_YAW, "frontal"), (PROFILE_MIN_YAW, "three-quarter")], "profile",
                 POSE_MARGIN)


class FaceGeometry:
    """Pose, sharpness, lighting and resolution of each face: no model, always available."""

    info = ModelInfo(name="facedata face geometry (keypoints, aligned crop)", version="1",
                     licence="Apache-2.0", source="facedata")
    attributes = ("pose", "sharpness", "lighting", "resolution")

    def predict(self, faces: list[FaceInput]) -> list[dict[str, Prediction]]:
        return [self._measure(face) for face in faces]

    def _measure(self, face: FaceInput) -> dict[str, Prediction]:
        yaw, pitch, _ = estimate_pose(face.kps)
        crop = align_face(face.image, face.kps)
        centre = cv2.cvtColor(crop[24:104, 20:92], cv2.COLOR_RGB2GRAY)
        side = float(min(face.bbox[2] - face.bbox[0], face.bbox[3] - face.bbox[1]))
        sharp = sharpness(crop)
        return {
            "pose": pose_of(yaw, pitch),
            # Blur is judged on a log scale: the Laplacian's variance spans two orders of magnitude.
            "sharpness": _band(math.log(max(sharp, 1e-3)), [(math.log(BLURRY_BELOW), "blurry"),
                                                          (math.log(SOFT_BELOW), "soft")], "sharp", 0.5),
            "lighting": _band(float(np.mean(centre)), [(DIM_BELOW, "dim"), (OVEREXPOSED_ABOVE, "well lit")],
                              "overexposed", LUMA_MARGIN),
            "resolution": _band(side, [(MEDIUM_RES_MIN, "low resolution"), (HIGH_RES_MIN, "medium resolution")],
                                "high resolution", 24.0),
        }
