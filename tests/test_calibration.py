"""The shipped attribute thresholds against the labelled real faces they were measured on.

The caption stage's default thresholds (facedata/attributes/calibration.json through
caption_stage.thresholds) must keep every statement a caption makes right at least 90% of the
time on the labelled set, overall and for each value stated: loosening a threshold, or shipping
one for an attribute the calibration left out, fails here. The models run once per module on the
253 labelled faces (~30 CPU-seconds).
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from facedata.attributes import _load
from facedata.attributes.calibration import (
    CALIBRATION_FILE, MEASURED, MIN_STATEMENTS, TARGET_PRECISION, at_threshold, default_thresholds, labelled_faces,
    predict, read_hand_labels, statements, withheld_values,
)  # fmt: skip
from facedata.attributes.base import Prediction
from facedata.captions.step import NEVER, confident, thresholds
from facedata.core.config import AttributeConfig

LABELS = REPO / "tests" / "data" / "attribute_labels.csv"


@pytest.fixture(scope="module")
def measured():
    faces = labelled_faces(LABELS)
    return faces, predict(_load(("age_gender", "expression", "parsing"), None, 1), faces)


def test_hand_labels_are_well_formed():
    rows = read_hand_labels(LABELS)
    assert len(rows) >= 80
    assert all(row["labels"] for row in rows)
    images = {row["image"] for row in rows}
    assert any(image.startswith("insightface") for image in images) and any("_sheet" in image for image in images)


def test_shipped_thresholds_keep_statements_right(measured):
    faces, preds = measured
    needed = thresholds(AttributeConfig())
    checked = []
    for name, threshold in needed.items():
        if name in MEASURED or "=" in name:  # "hair_color=gray": a value never stated
            continue
        r = at_threshold(statements(faces, preds, name), threshold)
        assert r["stated"] >= MIN_STATEMENTS, (name, r)
        assert r["precision"] >= TARGET_PRECISION, (name, threshold, r)
        for value, counts in r["by_value"].items():
            assert counts["right"] >= TARGET_PRECISION * counts["stated"], (name, value, threshold, r)
        checked.append(name)
    # Measured: gender 0.90 (female 133/134, male 83/92), expression 0.95 (24/24), smiling,
    # mouth_open and hair colour 0.50 (123/124, 51/52, 193/193).
    assert set(checked) >= {"gender", "expression", "smiling", "mouth_open", "hair_color"}


def test_unreliable_attributes_are_left_out_by_default(measured):
    faces, preds = measured
    shipped = default_thresholds()
    needed = thresholds(AttributeConfig())
    left_out = {name for name, threshold in shipped.items() if threshold is None}
    # Measured: none of these reaches 90% (age 0.69, age band 0.74, hair length 0.77: "long" for
    # P003's shoulder-length "medium" hair), or the set cannot show its misses (fewer than 3
    # faces with glasses, a hat, earrings, a necklace or bangs), or held-out photos showed a
    # failure the set lacks (beard: moustaches).
    assert left_out >= {"age", "age_band", "hair_length", "eyeglasses", "hat", "earrings", "necklace", "beard"}
    assert not left_out & set(needed)
    # Any threshold for them would be wrong too often or unmeasurable: e.g. age band and hair
    # length are under 90% at every threshold that still says something.
    for name in ("age_band", "hair_length"):
        rows = statements(faces, preds, name)
        assert all(
            at_threshold(rows, t)["precision"] < TARGET_PRECISION
            for t in (0.5, 0.7, 0.85, 0.9) if at_threshold(rows, t)["stated"] >= MIN_STATEMENTS
        ), name  # fmt: skip
    # Named in `include`, an attribute left out comes back at min_confidence; calibrated=False
    # restores min_confidence for every attribute.
    assert thresholds(AttributeConfig(include=["beard", "gender"])) == {"beard": 0.85, "gender": shipped["gender"]}
    assert set(thresholds(AttributeConfig(calibrated=False)).values()) == {0.85}


def test_values_too_few_faces_show_are_not_stated():
    """Gray, white and red hair: one labelled face allows each, so the colours the set can check
    (black, brown, blond) are stated and those are not."""
    needed = thresholds(AttributeConfig())
    assert withheld_values()["hair_color"] == ["red", "gray", "white"]
    assert {needed[f"hair_color={v}"] for v in ("red", "gray", "white")} == {NEVER}
    brown, gray = Prediction("brown", 0.999), Prediction("gray", 0.999)
    assert confident({"hair_color": brown}, needed) == {"hair_color": brown}
    assert confident({"hair_color": gray}, needed) == {}
    # A threshold of your own, or calibrated: false, states every value again.
    assert confident({"hair_color": gray}, thresholds(AttributeConfig(thresholds={"hair_color": 0.9}))) == {
        "hair_color": gray}
    assert confident({"hair_color": gray}, thresholds(AttributeConfig(calibrated=False))) == {"hair_color": gray}


def test_calibration_table_is_what_the_set_gives(measured):
    """The shipped table's figures are this set's (within a face or two: runtimes differ in the
    last digits of a confidence)."""
    faces, preds = measured
    table = json.loads(CALIBRATION_FILE.read_text())
    assert table["target_precision"] == TARGET_PRECISION and table["n_faces"] == len(faces)
    for name, entry in table["attributes"].items():
        threshold = entry["threshold"] if entry["threshold"] is not None else entry.get("would_be", 0.5)
        r = at_threshold(statements(faces, preds, name), threshold)
        assert r["n"] == entry["n"], name
        assert abs(r["stated"] - entry["stated"]) <= 2 and abs(r["right"] - entry["right"]) <= 2, (name, r, entry)
