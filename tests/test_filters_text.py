"""The filters on input rows (facedata.filters: caption language, caption text, people words,
metadata thresholds), run through Filter.process on rows as the reader gives them. Captions are
written here in the style of web alt text; the language model is py3langid's real one."""

from __future__ import annotations

import pytest

from facedata.core import records
from facedata.filters.caption_language import CaptionLanguage, detect_language
from facedata.filters.caption_text import CaptionText, boilerplate_kind
from facedata.filters.metadata import MetadataThresholds
from facedata.filters.people_words import DEFAULT_WORD_LIST, CaptionAboutPeople, read_word_list
from facedata.core.step import StepError, make_step


def rows(*captions, **extra):
    return [{"key": f"{i:09d}", "url": f"http://127.0.0.1/{i}.jpg", "caption": c, "status": records.OK, **extra}
            for i, c in enumerate(captions)]


def verdicts(step, samples):
    return step.process(samples).reasons


# --- caption language

def test_language_keeps_english_and_drops_other_languages():
    step = CaptionLanguage({"keep_languages": ["en"]})
    got = verdicts(step, rows("Portrait of a young woman smiling in a park",
                              "Porträt einer jungen Frau, die im Park lächelt",
                              "Retrato de una mujer joven sonriendo en un parque",
                              "一位年轻女子在公园里微笑的肖像", None))
    assert got == [None, "caption_language", "caption_language", "caption_language", "caption_language"]


def test_language_keep_list_and_probability_edge():
    caption = "Porträt einer jungen Frau, die im Park lächelt"
    lang, p = detect_language(caption)
    assert lang == "de"
    assert verdicts(CaptionLanguage({"keep_languages": ["en", "de"], "min_probability": p}), rows(caption)) == [None]
    above = min(1.0, p + 1e-6)
    assert verdicts(CaptionLanguage({"keep_languages": ["de"], "min_probability": above}), rows(caption)) == ["caption_language"]


def test_language_rows_already_dropped_are_left_alone():
    samples = rows("Porträt einer jungen Frau")
    samples[0]["status"] = records.TIMEOUT
    assert verdicts(CaptionLanguage(), samples) == [None]


def test_language_bad_options_are_one_line():
    with pytest.raises(StepError) as err:
        make_step("facedata.filters.caption_language:CaptionLanguage", {"keep_languages": ["english"]})
    assert "\n" not in str(err.value) and "keep_languages" in str(err.value) and "english" in str(err.value)
    with pytest.raises(StepError, match="min_probability"):
        make_step("facedata.filters.caption_language:CaptionLanguage", {"min_probability": 1.5})


# --- caption text: boilerplate and length

@pytest.mark.parametrize("caption, kind", [
    ("IMG_1234.jpg", "file_name"), ("portrait_final_v2.png", "file_name"), ("DSC_0001", "frame_name"),
    ("DSCN0042", "frame_name"), ("PXL_20230101_123456789", "frame_name"),
    ("WhatsApp Image 2021-01-01 at 10.00.00", "frame_name"), ("https://example.com/a/b.jpg", "url"),
    ("www.example.org", "url"), ("photo", "placeholder"), ("Untitled.", "placeholder"), ("IMAGE", "placeholder"),
    ("12345 - 678", "no_letters"),
    ("Image of a man in a red coat", None), ("Photo: the mayor opens the new library", None),
    ("Smiling woman", None), ("Dr. Jane Goodall speaking at example.com's conference", None),
])
def test_boilerplate_kinds(caption, kind):
    assert boilerplate_kind(caption) == kind


def test_caption_text_reasons_and_length_edges():
    step = CaptionText({"min_words": 2, "max_words": 7, "min_chars": 8, "max_chars": 40})
    got = verdicts(step, rows("IMG_1234.jpg", "Smiling", "A man", "Smiling woman",
                              "A tall man in a grey coat", "A tall man in a grey wool coat", None, "   "))
    assert got == ["caption_boilerplate", "caption_too_short", "caption_too_short", None,
                   None, "caption_too_long", "caption_too_short", "caption_too_short"]
    assert verdicts(CaptionText({"max_chars": 13}), rows("Smiling woman", "Smiling women!")) == [None, "caption_too_long"]


def test_caption_text_boilerplate_switch_and_extra_placeholders():
    assert verdicts(CaptionText({"drop_boilerplate": False, "min_words": 1}), rows("IMG_1234.jpg")) == [None]
    step = CaptionText({"extra_placeholders": ["Product Shot"]})
    assert verdicts(step, rows("product shot", "Product shot of a watch")) == ["caption_boilerplate", None]


def test_caption_text_bad_options_are_one_line():
    with pytest.raises(StepError) as err:
        make_step("facedata.filters.caption_text:CaptionText", {"min_words": 10, "max_words": 3})
    assert "\n" not in str(err.value) and "max_words 3 is under min_words 10" in str(err.value)
    with pytest.raises(StepError, match="options.min_chars"):
        make_step("facedata.filters.caption_text:CaptionText", {"min_chars": -1})


# --- people words

def test_people_words_keep_captions_about_people():
    step = CaptionAboutPeople()
    got = verdicts(step, rows("Portrait of a young woman smiling", "Actors arrive at the premiere",
                              "The president's speech in Berlin", "Obama with his wife at dinner",
                              "Mountain lake at sunset", "Red sports car on a race track", None))
    assert got == [None, None, None, None, "caption_not_about_people", "caption_not_about_people",
                   "caption_not_about_people"]


def test_people_words_min_matches_edge():
    caption = "Portrait of a young woman"  # portrait, woman: two matches
    assert verdicts(CaptionAboutPeople({"min_matches": 2}), rows(caption)) == [None]
    assert verdicts(CaptionAboutPeople({"min_matches": 3}), rows(caption)) == ["caption_not_about_people"]


def test_people_words_user_list_replaces_the_shipped_one(tmp_path):
    shipped = read_word_list(str(DEFAULT_WORD_LIST))
    assert {"woman", "actor", "mother", "she", "french"} <= shipped
    own = tmp_path / "words.txt"
    own.write_text("# only climbers\nclimber\n")
    step = CaptionAboutPeople({"word_list": str(own)})
    assert verdicts(step, rows("Climbers on the north face", "Portrait of a young woman")) == [
        None, "caption_not_about_people"]
    assert step.settings()["word_list_sha256"] != CaptionAboutPeople().settings()["word_list_sha256"]
    with pytest.raises(StepError, match="no such file"):
        make_step("facedata.filters.people_words:CaptionAboutPeople", {"word_list": str(tmp_path / "missing.txt")})


# --- metadata thresholds

def laion_row(**columns):
    # The reader carries extra columns as strings (numbers in their JSON spelling).
    return {"key": "000000000", "caption": "A woman", "status": records.OK,
            **{k: (v if isinstance(v, str) or v is None else str(v)) for k, v in columns.items()}}


def test_metadata_each_threshold_and_its_edge():
    step = MetadataThresholds({"min_similarity": 0.3, "max_punsafe": 0.1, "max_nsfw_tag": "UNLIKELY",
                               "max_pwatermark": 0.8, "min_width": 200, "min_height": 150})
    samples = [
        laion_row(similarity=0.3, punsafe=0.1, NSFW="UNLIKELY", pwatermark=0.8, WIDTH=200, HEIGHT=150),  # all at the edge
        laion_row(similarity=0.2999),
        laion_row(punsafe=0.1001),
        laion_row(NSFW="UNSURE"),
        laion_row(NSFW="NSFW"),
        laion_row(pwatermark=0.95),
        laion_row(WIDTH=199, HEIGHT=400),
        laion_row(WIDTH=400, HEIGHT=149),
        laion_row(),  # no metadata: nothing to judge here
        laion_row(similarity="null", NSFW=None),
    ]
    assert verdicts(step, samples) == [None, "low_similarity", "unsafe_tag", "unsafe_tag", "unsafe_tag",
                                       "watermark_probability", "declared_too_small", "declared_too_small",
                                       None, None]
    assert verdicts(MetadataThresholds({"max_nsfw_tag": "UNSURE"}),
                    [laion_row(NSFW="UNSURE"), laion_row(NSFW="NSFW"), laion_row(NSFW="garbled")]) == [
        None, "unsafe_tag", "unsafe_tag"]


def test_metadata_column_names_case_and_override():
    assert verdicts(MetadataThresholds({"min_width": 300}), [laion_row(width=250)]) == ["declared_too_small"]
    step = MetadataThresholds({"min_similarity": 0.3, "similarity_col": "clip_score"})
    assert verdicts(step, [laion_row(clip_score=0.1, similarity=0.9)]) == ["low_similarity"]


def test_metadata_bad_options_are_one_line():
    with pytest.raises(StepError) as err:
        make_step("facedata.filters.metadata:MetadataThresholds", {})
    assert "\n" not in str(err.value) and "no threshold set" in str(err.value)
    with pytest.raises(StepError, match="max_nsfw_tag"):
        make_step("facedata.filters.metadata:MetadataThresholds", {"max_nsfw_tag": "MAYBE"})
    with pytest.raises(StepError, match="max_punsafe"):
        make_step("facedata.filters.metadata:MetadataThresholds", {"max_punsafe": 2})
