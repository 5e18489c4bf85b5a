"""Face captions: composed from the confident attributes of an image's faces, measured for variety,
and optionally rewritten by a local language model under a guard.

`compose_caption` is a small seeded grammar. Each image draws its own sentence structure, synonyms,
attribute order and clause joining from `random.Random(seed)`, so the same seed and attributes give
the same caption while a dataset gets varied wording. It says only what the attributes say: an
absent attribute is never mentioned or guessed, a negative one ("eyeglasses" False) only now and
then and only when the model was sure, a person whose gender is not known is "a person" and
"they", and nobody is ever named. A group photo's caption says how many people it shows and
describes each of its described faces (`attributes.max_faces` of them at most), primary first.

`attribute_words` reads a caption back into attribute values ("eyeglasses=True", "age=30s") through
the same synonym table the composer writes with; `rewrite_caption` keeps a model's rewrite only
when it says exactly the values the composed caption said and adds no name-like word.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from facedata.attributes.vocabulary import ATTRIBUTES
from facedata.core.errors import UserError

if TYPE_CHECKING:
    from facedata.attributes.base import Prediction

__all__ = [
    "DEFAULT_ALLOWED",
    "Rewriter",
    "TransformersRewriter",
    "attribute_words",
    "caption_stats",
    "compose_caption",
    "face_words",
    "load_rewriter",
    "rewrite_caption",
    "rewrite_keeps_attributes",
]

# The vocabulary was drawn up without special-category attributes (no ethnicity, health, religion),
# and age and gender are what face-caption datasets describe, so by default every attribute may be
# said; a run that must not state gender or age passes `allowed` without them.
DEFAULT_ALLOWED = frozenset(ATTRIBUTES)

# A smile this sure, with an open mouth or a happy expression, may be called a grin or beaming.
STRONG_SMILE = 0.9
# A negative boolean ("no glasses") is said only this sure, and then only in this share of captions:
# absence is mostly not worth a caption's words.
SURE_NEGATIVE = 0.9
NEGATIVE_SHARE = 0.15
# Pose, sharpness, lighting and resolution describe the shot rather than the person: each is said
# in this share of captions, so captions do not all end in the same technical tail.
IMAGE_PHRASE_SHARE = 0.65

_MINOR_STAGES = ("child", "teenager")
# Decades that agree with each age band; an estimated age outside them is left unsaid rather than
# contradict the band ("an elderly man in his twenties").
_BAND_DECADES = {
    "young adult": range(20, 40),
    "adult": range(20, 70),
    "middle-aged": range(40, 70),
    "senior": range(60, 100),
}
_DECADE_WORDS = {20: "twenties", 30: "thirties", 40: "forties", 50: "fifties", 60: "sixties", 70: "seventies",
                 80: "eighties", 90: "nineties"}
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")

# (age stage, gender) -> the nouns for that person, without article. A child is never a man or woman.
_NOUNS: dict[tuple[str | None, str | None], tuple[str, ...]] = {
    ("child", "female"): ("girl", "little girl", "young girl"),
    ("child", "male"): ("boy", "little boy", "young boy"),
    ("child", None): ("child", "kid", "young child"),
    ("teenager", "female"): ("teenage girl", "teen girl", "female teenager"),
    ("teenager", "male"): ("teenage boy", "teen boy", "male teenager"),
    ("teenager", None): ("teenager", "teen", "adolescent"),
    ("young adult", "female"): ("young woman", "young lady"),
    ("young adult", "male"): ("young man", "young guy"),
    ("young adult", None): ("young adult", "young person"),
    ("adult", "female"): ("woman", "adult woman"),
    ("adult", "male"): ("man", "adult man"),
    ("adult", None): ("adult", "adult person"),
    ("middle-aged", "female"): ("middle-aged woman", "middle-aged lady"),
    ("middle-aged", "male"): ("middle-aged man",),
    ("middle-aged", None): ("middle-aged person",),
    ("senior", "female"): ("elderly woman", "older woman", "old woman", "elderly lady"),
    ("senior", "male"): ("elderly man", "older man", "old man", "elderly gentleman"),
    ("senior", None): ("elderly person", "older person", "senior"),
    (None, "female"): ("woman", "lady"),
    (None, "male"): ("man", "gentleman", "guy"),
    (None, None): ("person", "individual"),
}
_PRONOUNS = {"female": ("she", "her"), "male": ("he", "his"), None: ("they", "their")}


@dataclass(frozen=True)
class _Phrases:
    """The ways one attribute value can be said about a person. "{pos}" stands for her/his/their."""

    adjs: tuple[str, ...] = ()  # before the noun: "bespectacled"
    nps: tuple[str, ...] = ()  # after "with": "glasses"
    verbs: tuple[tuple[str, str], ...] = ()  # (base verb, rest): ("wear", "glasses")
    parts: tuple[tuple[str, str], ...] = ()  # after the noun: ("wearing", "glasses"), ("", "in profile")
    shot_adjs: tuple[str, ...] = ()  # poses only: "profile" in "a profile photo"


@dataclass(frozen=True)
class _SceneBit:
    """One image-level value: before the photo noun, after "is", or as a trailing phrase."""

    adjs: tuple[str, ...]
    preds: tuple[str, ...]
    parts: tuple[str, ...]


def _ph(adjs=(), nps=(), verbs=(), parts=(), shot_adjs=()) -> _Phrases:
    return _Phrases(tuple(adjs), tuple(nps), tuple(verbs), tuple(parts), tuple(shot_adjs))


_EXPRESSIONS = {
    "happy": _ph(("happy", "cheerful", "joyful"), ("a happy expression", "a cheerful expression", "a joyful look"),
                 (("look", "happy"), ("look", "cheerful"), ("appear", "joyful")),
                 (("looking", "happy"), ("looking", "cheerful"))),
    "sad": _ph(("sad", "sorrowful", "unhappy"), ("a sad expression", "a sorrowful look", "a downcast look"),
               (("look", "sad"), ("look", "unhappy"), ("appear", "sorrowful")),
               (("looking", "sad"), ("looking", "downcast"))),
    "angry": _ph(("angry", "scowling"), ("an angry expression", "an angry look", "a scowl"),
                 (("look", "angry"), ("scowl", "")), (("looking", "angry"), ("", "scowling"))),
    "disgust": _ph(("disgusted",), ("a disgusted expression", "a look of disgust"),
                   (("look", "disgusted"), ("appear", "disgusted")),
                   (("looking", "disgusted"), ("with", "a look of disgust"))),
    "fear": _ph(("frightened", "fearful", "scared"), ("a fearful expression", "a frightened look", "a look of fear"),
                (("look", "frightened"), ("look", "scared"), ("appear", "fearful")),
                (("looking", "frightened"), ("looking", "scared"))),
    "surprise": _ph(("surprised", "astonished", "wide-eyed"),
                    ("a surprised expression", "a look of surprise", "an astonished look"),
                    (("look", "surprised"), ("look", "astonished"), ("appear", "surprised")),
                    (("looking", "surprised"), ("looking", "astonished"))),
    "neutral": _ph(("straight-faced", "expressionless"),
                   ("a neutral expression", "a blank expression", "a calm expression", "a straight face"),
                   (("have", "a neutral expression"), ("keep", "a straight face"), ("have", "a blank expression")),
                   (("with", "a neutral expression"), ("with", "a calm expression"))),
}
_POSES = {
    "frontal": _ph(verbs=(("face", "the camera"), ("face", "forward"), ("look", "straight at the camera")),
                   parts=(("", "facing the camera"), ("", "facing forward"), ("", "seen from the front")),
                   shot_adjs=("frontal", "front-facing")),
    "three-quarter": _ph(verbs=(("be", "turned slightly to one side"), ("be", "seen in three-quarter view"),
                                ("turn", "slightly away from the camera")),
                         parts=(("", "in three-quarter view"), ("", "turned slightly to one side"),
                                ("with", "{pos} head turned slightly")),
                         shot_adjs=("three-quarter",)),
    "profile": _ph(verbs=(("be", "in profile"), ("be", "seen from the side")),
                   parts=(("", "in profile"), ("", "seen from the side")),
                   shot_adjs=("profile", "side-view")),
    "looking up": _ph(verbs=(("look", "up"), ("gaze", "upward"), ("tilt", "{pos} head up")),
                      parts=(("", "looking up"), ("", "gazing upward"), ("with", "{pos} head tilted up"))),
    "looking down": _ph(verbs=(("look", "down"), ("gaze", "downward"), ("tilt", "{pos} head down")),
                        parts=(("", "looking down"), ("", "gazing downward"), ("with", "{pos} head tilted down"))),
}
_SCENE = {
    ("sharpness", "sharp"): _SceneBit(("sharp", "crisp", "in-focus"), ("sharp", "crisp", "in focus"),
                                      ("in sharp focus",)),
    ("sharpness", "soft"): _SceneBit(("slightly soft", "soft-focus"), ("slightly soft", "a little soft"),
                                     ("in soft focus",)),
    ("sharpness", "blurry"): _SceneBit(("blurry", "blurred", "out-of-focus"),
                                       ("blurry", "blurred", "out of focus"), ("out of focus",)),
    ("lighting", "well lit"): _SceneBit(("well-lit", "brightly lit", "evenly lit"),
                                        ("well lit", "brightly lit", "evenly lit"),
                                        ("in good light", "in bright light")),
    ("lighting", "dim"): _SceneBit(("dim", "dimly lit", "low-light", "poorly lit"),
                                   ("dim", "dimly lit", "poorly lit"), ("in dim light", "in low light")),
    ("lighting", "overexposed"): _SceneBit(("overexposed", "washed-out"), ("overexposed", "washed out"),
                                           ("with blown-out highlights",)),
    ("resolution", "high resolution"): _SceneBit(("high-resolution", "hi-res", "high-definition"),
                                                 ("high resolution", "high-resolution"),
                                                 ("in high resolution", "at high resolution")),
    ("resolution", "medium resolution"): _SceneBit(("medium-resolution", "mid-resolution"),
                                                   ("medium resolution", "of medium resolution"),
                                                   ("at medium resolution",)),
    ("resolution", "low resolution"): _SceneBit(("low-resolution", "low-res", "pixelated"),
                                                ("low resolution", "pixelated", "low-res"),
                                                ("at low resolution", "in low resolution")),
}
_SMILE = _ph(("smiling",), ("a smile",), (("smile", ""), ("be", "smiling")), (("", "smiling"),))
_STRONG_SMILE = _ph(("smiling", "grinning", "beaming"), ("a smile", "a broad smile", "a big smile"),
                    (("smile", ""), ("be", "smiling"), ("grin", ""), ("beam", "")),
                    (("", "smiling"), ("", "grinning"), ("", "beaming"), ("with", "a broad smile")))
_HAIR_COLORS = {"black": ("black", "jet-black"), "brown": ("brown", "chestnut-brown"),
                "blond": ("blond", "blonde", "fair"), "red": ("red", "ginger", "auburn"),
                "gray": ("gray", "grey", "silver"), "white": ("white", "snow-white")}
_HAIR_LENGTHS = {"short": ("short", "cropped", "close-cropped"),
                 "medium": ("medium-length", "shoulder-length", "mid-length"), "long": ("long",)}
_PHOTO_NOUNS = ("photo", "photograph", "picture", "image", "shot", "snapshot")
_PORTRAIT_NOUNS = ("portrait", "close-up", "headshot", "close-up portrait", "portrait photo")


def _value(face: dict[str, Prediction], name: str):
    return face[name].value if name in face else None


def _sure_negative(face: dict[str, Prediction], name: str, rng: random.Random) -> bool:
    """Whether to say that a boolean attribute is absent: only when sure, and only now and then.
    The draw happens for every face so that the rest of the caption does not depend on it."""
    draw = rng.random()
    return name in face and not face[name].value and face[name].confidence >= SURE_NEGATIVE and draw < NEGATIVE_SHARE


def _hair(face: dict[str, Prediction], rng: random.Random) -> list[_Phrases]:
    length, color = _value(face, "hair_length"), _value(face, "hair_color")
    if length == "bald":  # a colour for a bald head is leftover stubble at most: left unsaid
        return [_ph(("bald", "bald-headed"), ("a bald head",), (("be", "bald"),), (("with", "a bald head"),))]
    c = rng.choice(_HAIR_COLORS[color]) if color else None
    n = rng.choice(_HAIR_LENGTHS[length]) if length else None
    split = rng.random() < 0.3
    if c and n and not split:
        hair = f"{n} {c} hair"
        return [_ph(nps=(hair,), verbs=(("have", hair),), parts=(("with", hair),))]
    out = []
    if c and n:  # split: the colour only as an adjective, "a blond woman with long hair"
        out.append(_ph((f"{c}-haired", c) if c in ("blond", "blonde") else (f"{c}-haired",)))
    elif c:
        out.append(_ph((f"{c}-haired",), (f"{c} hair",), (("have", f"{c} hair"),), (("with", f"{c} hair"),)))
    if n:
        hair = f"{n} hair"
        out.append(_ph((f"{length}-haired",) if length in ("short", "long") and not c else (), (hair,),
                       (("have", hair),), (("with", hair),)))
    return out


def _features(face: dict[str, Prediction], gender: str | None, minor: bool, rng: random.Random,
              brief: bool = False) -> list[_Phrases]:
    """Everything said about one person beyond noun and age, one entry per attribute value. A
    `brief` person (a group photo's other faces) gets no negatives and no pose: only what they have."""

    def negative(name: str) -> bool:
        return not brief and _sure_negative(face, name, rng)

    feats: list[_Phrases] = []
    smiling = _value(face, "smiling")
    expression = _value(face, "expression")
    if smiling:
        strong = face["smiling"].confidence >= STRONG_SMILE and (_value(face, "mouth_open") or expression == "happy")
        feats.append(_STRONG_SMILE if strong else _SMILE)
    elif negative("smiling"):
        feats.append(_ph(("unsmiling",), verbs=(("be", "not smiling"),),
                         parts=(("", "not smiling"), ("", "unsmiling"))))
    # A neutral face that smiles is the expression model missing the smile: say the smile only.
    if expression and not (expression == "neutral" and smiling):
        feats.append(_EXPRESSIONS[expression])
    if _value(face, "mouth_open"):
        feats.append(_ph(("open-mouthed",), ("an open mouth", "parted lips"),
                         (("have", "{pos} mouth open"), ("have", "parted lips")),
                         (("with", "{pos} mouth open"), ("with", "lips parted"), ("with", "an open mouth"))))
    elif negative("mouth_open"):
        feats.append(_ph(verbs=(("keep", "{pos} mouth closed"),),
                         parts=(("with", "{pos} mouth closed"), ("with", "closed lips"))))
    feats += _hair(face, rng)
    if _value(face, "bangs"):
        feats.append(_ph(nps=("bangs", "a fringe"), verbs=(("have", "bangs"), ("have", "a fringe")),
                         parts=(("with", "bangs"), ("with", "a fringe"))))
    if _value(face, "eyeglasses"):
        feats.append(_ph(("bespectacled",), ("glasses", "eyeglasses", "spectacles", "a pair of glasses"),
                         (("wear", "glasses"), ("wear", "eyeglasses"), ("wear", "spectacles")),
                         (("wearing", "glasses"), ("wearing", "spectacles"), ("in", "glasses"))))
    elif negative("eyeglasses"):
        feats.append(_ph(verbs=(("wear", "no glasses"), ("be", "not wearing glasses")),
                         parts=(("", "without glasses"), ("", "not wearing glasses"))))
    if _value(face, "hat"):
        feats.append(_ph(nps=("a hat", "headwear"), verbs=(("wear", "a hat"), ("wear", "headwear")),
                         parts=(("wearing", "a hat"), ("in", "a hat"))))
    elif negative("hat"):
        feats.append(_ph(("bareheaded",), verbs=(("be", "bareheaded"), ("wear", "no hat")),
                         parts=(("", "without a hat"), ("", "bareheaded"))))
    if _value(face, "earrings"):
        feats.append(_ph(nps=("earrings", "a pair of earrings"), verbs=(("wear", "earrings"),),
                         parts=(("wearing", "earrings"),)))
    if _value(face, "necklace"):
        feats.append(_ph(nps=("a necklace",), verbs=(("wear", "a necklace"),), parts=(("wearing", "a necklace"),)))
    if _value(face, "beard"):
        feats.append(_ph(("bearded",), ("a beard", "facial hair"),
                         (("have", "a beard"), ("have", "facial hair"), ("sport", "a beard")),
                         (("with", "a beard"), ("with", "facial hair"))))
    elif negative("beard") and gender != "female" and not minor:  # no "clean-shaven girl"
        feats.append(_ph(("clean-shaven",), verbs=(("be", "clean-shaven"),), parts=(("", "clean-shaven"),)))
    pose = None if brief else _value(face, "pose")
    if pose and rng.random() < IMAGE_PHRASE_SHARE:
        feats.append(_POSES[pose])
    rng.shuffle(feats)
    return feats


@dataclass
class _Person:
    noun: str  # without article or adjectives: "young woman"
    post: str  # after the noun: " in her thirties", or ""
    subject: str  # she / he / they
    pos: str  # her / his / their
    feats: list[_Phrases]
    empty: bool  # nothing at all is known about this person


def _person(face: dict[str, Prediction], rng: random.Random, brief: bool = False) -> _Person:
    gender = _value(face, "gender")
    stage = _value(face, "age_band")
    age = _value(face, "age")
    age = None if age is None else float(age)
    if age is not None and age < 20 and stage not in _MINOR_STAGES:
        stage = "child" if age < 13 else "teenager"  # the estimate says minor: never "a man"
    decade = None
    if age is not None and 20 <= age < 100 and stage not in _MINOR_STAGES:
        decade = int(age) // 10 * 10
        if stage in _BAND_DECADES and decade not in _BAND_DECADES[stage]:
            decade = None
    subject, pos = _PRONOUNS[gender]
    noun = rng.choice(_NOUNS[(stage, gender)])
    post = f" in {pos} {rng.choice((_DECADE_WORDS[decade], f'{decade}s'))}" if decade else ""
    feats = _features(face, gender, stage in _MINOR_STAGES, rng, brief)
    empty = gender is None and stage is None and decade is None and not feats
    return _Person(noun, post, subject, pos, feats, empty)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: list[str], rng: random.Random) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + rng.choice((" and ", ", and ")) + items[-1]


def _count(n: int) -> str:
    return _COUNT_WORDS[n] if n < len(_COUNT_WORDS) else str(n)


def _conjugate(verb: str, singular: bool) -> str:
    if verb == "be":
        return "is" if singular else "are"
    if verb == "have":
        return "has" if singular else "have"
    return verb + "s" if singular else verb


class _Draft:
    """One caption being written: the person's attributes and the image-level values still unsaid.
    Every helper says some of them and removes them, so each is said exactly once."""

    def __init__(self, person: _Person, scene: list[_SceneBit], rng: random.Random, portrait: bool):
        self.p = person
        self.feats = list(person.feats)
        self.scene = list(scene)
        self.rng = rng
        self.portrait = portrait  # one face: "portrait", "close-up" and pose adjectives fit the shot

    def _fill(self, text: str) -> str:
        return text.replace("{pos}", self.p.pos)

    def noun_phrase(self, max_adjs: int = 2) -> str:
        """Article, adjectives, noun and age: "a smiling, bespectacled young woman in her thirties"."""
        adjs = []
        for feat in list(self.feats):
            adjective_only = not (feat.nps or feat.verbs or feat.parts)
            if adjective_only or (feat.adjs and len(adjs) < max_adjs and self.rng.random() < 0.4):
                adjs.append(self.rng.choice(feat.adjs))
                self.feats.remove(feat)
        sep = self.rng.choice((" ", ", ")) if len(adjs) == 2 else ", "  # three (max_adjs and a hair colour): commas
        return _article(sep.join(adjs) + (" " if adjs else "") + self.p.noun) + self.p.post

    def _parts(self, feats: list[_Phrases]) -> list[str]:
        """Participle and prepositional phrases, with "with" and "wearing" items merged."""
        groups: dict[str, list[str]] = {}
        for feat in feats:
            head, rest = self.rng.choice(feat.parts) if feat.parts else ("with", self.rng.choice(feat.nps))
            key = head if head in ("with", "wearing") else f"{head} {rest}"
            groups.setdefault(key, []).append(rest)
        return [self._fill(key + " " + _join(rests, self.rng) if key in ("with", "wearing") else key.strip())
                for key, rests in groups.items()]

    def with_phrase(self) -> str:
        """Say every remaining feature after the noun: " with long hair and glasses, looking down"."""
        withs, parts = [], []
        for feat in self.feats:
            if feat.nps and (not feat.parts or self.rng.random() < 0.6):
                withs.append(self.rng.choice(feat.nps))
                continue
            head, rest = self.rng.choice(feat.parts)
            if head == "with":
                withs.append(rest)
            else:
                parts.append(_ph(parts=((head, rest),)))
        self.feats = []
        text = f" with {self._fill(_join(withs, self.rng))}" if withs else ""
        rest = self._parts(parts)
        return text + (", " + _join(rest, self.rng) if rest else "")

    def parts_phrase(self) -> str:
        """Every remaining feature as participles: "wearing glasses and a hat, looking down"."""
        text = _join(self._parts(self.feats), self.rng)
        self.feats = []
        return text

    def verb_phrase(self, subject: str) -> str:
        """Every remaining feature as the predicate of `subject` (a pronoun, a noun phrase or "who"):
        "has a beard and short gray hair and faces the camera". Empty when nothing is left."""
        groups: dict[str, list[str]] = {}
        for feat in self.feats:
            verb, rest = self.rng.choice(feat.verbs)
            key = verb if verb in ("have", "wear", "be") else f"{verb} {rest}"
            groups.setdefault(key, []).append(rest)
        self.feats = []

        def clauses(items: list[tuple[str, list[str]]], singular: bool) -> str:
            out = []
            for key, rests in items:
                verb, _, own = key.partition(" ")
                tail = _join(rests, self.rng) if verb in ("have", "wear", "be") else own
                out.append(self._fill(f"{_conjugate(verb, singular)} {tail}".strip()))
            return _join(out, self.rng)

        items = list(groups.items())
        if len(items) >= 3 and self.rng.random() < 0.5:  # long lists read better as two sentences
            half, again = len(items) // 2, self.p.subject
            more = clauses(items[half:], again != "they")
            verb, _, rest = more.partition(" ")
            more = f"{verb} also {rest}" if verb in ("is", "are") else f"also {more}"
            return f"{clauses(items[:half], subject != 'they')}. {_cap(again)} {more}"
        return clauses(items, subject != "they")

    def subject(self) -> str:
        return self.p.subject if self.rng.random() < 0.7 else f"the {self.p.noun}"

    def shot(self, article: bool = True) -> str:
        """The photo noun, perhaps with image-level adjectives: "a blurry, dimly lit profile portrait"."""
        nouns = _PHOTO_NOUNS + _PORTRAIT_NOUNS if self.portrait else _PHOTO_NOUNS
        adjs = []
        for bit in list(self.scene):
            if len(adjs) < 2 and self.rng.random() < 0.6:
                adjs.append(self.rng.choice(bit.adjs))
                self.scene.remove(bit)
        text = ", ".join(adjs)
        pose = next((f for f in self.feats if f.shot_adjs), None)
        if self.portrait and pose and self.rng.random() < 0.4:
            text += " " + self.rng.choice(pose.shot_adjs)
            self.feats.remove(pose)
        text = (text + " " + self.rng.choice(nouns)).strip()
        return _article(text) if article else text

    def scene_tail(self) -> str:
        """Image-level values not yet said, as a closing sentence."""
        bits, self.scene = self.scene, []
        if not bits:
            return ""
        form = self.rng.randrange(3)
        if form == 0:
            return f" The {self.rng.choice(('photo', 'image', 'picture', 'shot'))} is " \
                   f"{_join([self.rng.choice(b.preds) for b in bits], self.rng)}."
        if form == 1:
            return f" {_cap(', '.join(self.rng.choice(b.adjs) for b in bits))} {self.rng.choice(_PHOTO_NOUNS)}."
        return f" Taken {_join([self.rng.choice(b.parts) for b in bits], self.rng)}."


# One face. Each template says every remaining feature; the scene tail says the remaining image values.
def _t_with(d: _Draft) -> str:
    np_ = d.noun_phrase()
    with_ = d.with_phrase()
    return f"{_cap(np_)}{with_}." if with_ else f"{_cap(np_)} in {d.shot()}."


def _t_shot_clause(d: _Draft) -> str:
    shot = d.shot(article=d.rng.random() < 0.7)
    np_, subject = d.noun_phrase(1), d.subject()
    verbs = d.verb_phrase(subject)
    return f"{_cap(shot)} of {np_}" + (f"; {subject} {verbs}." if verbs else ".")


def _t_shows(d: _Draft) -> str:
    shot, np_ = d.shot(article=False), d.noun_phrase(1)
    keep = [f for f in d.feats if d.rng.random() < 0.5]
    d.feats = [f for f in d.feats if f not in keep]
    with_ = d.with_phrase()
    d.feats, subject = keep, d.subject()
    verbs = d.verb_phrase(subject)
    return f"This {shot} shows {np_}{with_}." + (f" {_cap(subject)} {verbs}." if verbs else "")


def _t_face_of(d: _Draft) -> str:
    opening = d.rng.choice(("The face of", "A face of", "A close-up of the face of"))
    np_ = d.noun_phrase()
    parts = d.parts_phrase()
    return f"{opening} {np_}" + (f", {parts}." if parts else ".")


def _t_sentence(d: _Draft) -> str:
    np_ = d.noun_phrase()
    verbs = d.verb_phrase(np_)
    if not verbs:
        return f"{_cap(d.shot())} of {np_}."
    where = f" in this {d.shot(article=False)}" if d.rng.random() < 0.4 else ""
    return f"{_cap(np_)} {verbs}{where}."


def _t_who(d: _Draft) -> str:
    shot, np_ = d.shot(), d.noun_phrase(1)
    verbs = d.verb_phrase("who")
    return f"{_cap(shot)} of {np_}" + (f" who {verbs}." if verbs else ".")


def _t_parts_first(d: _Draft) -> str:
    np_ = d.noun_phrase()
    parts = d.parts_phrase()
    return f"{_cap(np_)}" + (f", {parts}," if parts else "") + f" in {d.shot()}."


def _t_colon(d: _Draft) -> str:
    shot, np_ = d.shot(article=d.rng.random() < 0.5), d.noun_phrase(1)
    items = [d._fill(d.rng.choice(f.nps)) if f.nps and d.rng.random() < 0.7 else d._parts([f])[0] for f in d.feats]
    d.feats = []
    return f"{_cap(shot)} of {np_}" + (f": {', '.join(items)}." if items else ".")


def _t_pictured(d: _Draft) -> str:
    opening = d.rng.choice(("Pictured is", "Here is", "Shown here is", "Pictured:"))
    return f"{opening} {d.noun_phrase()}{d.with_phrase()}."


_SINGLE = (_t_with, _t_shot_clause, _t_shows, _t_face_of, _t_sentence, _t_who, _t_parts_first, _t_colon, _t_pictured)


def _single(d: _Draft) -> str:
    if d.p.empty:
        face = d.rng.choice(("a person's face", "a face", "a human face", "someone's face"))
        form = d.rng.randrange(3)
        if form == 0:
            text = f"{_cap(d.shot())} of {face}."
        elif form == 1:
            text = f"{_cap(face)} in {d.shot()}."
        else:
            text = f"{_cap(d.shot())} showing {face}."
    else:
        text = d.rng.choice(_SINGLE)(d)
    return text + d.scene_tail()


_OBJECT_PRONOUNS = {"she": "her", "he": "him", "they": "them"}
_OTHER_OPENINGS = ("Another is", "Another person is", "One of the others is", "There is also",
                   "Also in the picture is")


def _item(d: _Draft) -> str:
    """One other person of a group, for a list: "a bearded man with short hair"."""
    return d.noun_phrase(1) + d.with_phrase()


def _list(items: list[str], rng: random.Random) -> str:
    """Items joined; with semicolons when an item has commas of its own."""
    if any("," in item for item in items):
        return "; ".join(items[:-1]) + "; and " + items[-1]
    return _join(items, rng)


def _others(d: _Draft, n: int, others: list[_Person], all_described: bool) -> str:
    """Every other described person of a group, in full (they are brief persons: no negatives or
    pose), as a sentence each or as one list."""
    rng = d.rng
    drafts = [_Draft(other, [], rng, portrait=False) for other in others]
    if not drafts:
        return ""
    known = not d.p.empty
    # "With them" would read as the whole group: a person of unknown gender is named again.
    lead = f"the {d.p.noun}" if d.p.subject == "they" else _OBJECT_PRONOUNS[d.p.subject]
    if len(drafts) >= 2 and rng.random() < 0.4:
        if not known:
            opener = rng.choice(("They are", "They include") if all_described else ("Among them are", "They include"))
        elif all_described:
            opener = rng.choice(("The others are", f"With {lead} are"))
        else:
            opener = rng.choice(("Among the others are", "The others include"))
        return f" {opener} {_list([_item(o) for o in drafts], rng)}."
    openings = list(_OTHER_OPENINGS)
    rng.shuffle(openings)
    text = ""
    for i, o in enumerate(drafts):
        if i == 0 and not known:
            opening = rng.choice(("One of them is", "Among them is"))
        elif n == 2:
            opening = rng.choice(("The other person is", "The second person is",
                                  f"With {lead} is"))
        else:
            opening = openings[i % len(openings)]
        np_ = o.noun_phrase(1)
        if rng.random() < 0.35:
            verbs = o.verb_phrase("who")
            text += f" {opening} {np_}" + (f" who {verbs}." if verbs else ".")
        else:
            text += f" {opening} {np_}{o.with_phrase()}."
    return text


def _group(d: _Draft, n: int, n_described: int, others: list[_Person]) -> str:
    """A photo of `n` faces, `n_described` of them described: the primary person (when anything is
    known about them) in one of five structures, then each of `others` (the other described faces
    that have something to say). The count is always said: "three people", "a group of five
    people" when not everyone is described, or the primary person and "four other people"."""
    rng = d.rng
    count = _count(n)
    all_described = n_described >= n
    if n == 2:
        group = rng.choice(("two people", "two persons"))
    elif all_described:
        group = f"{count} people"
    else:
        group = rng.choice((f"a group of {count} people", f"a group of {count} people", f"{count} people"))
    if d.p.empty:
        form = rng.randrange(3)
        if form == 0:
            text = f"{_cap(d.shot())} of {group}."
        elif form == 1:
            text = f"{_cap(group)} in {d.shot()}."
        else:
            text = f"{_cap(d.shot())} showing {group}."
    else:
        form = rng.randrange(5)
        if form == 0:
            front = rng.choice(("the person in front", "the person in the foreground", "the main subject"))
            shot = d.shot()
            text = f"{_cap(group)} in {shot}; {front} is {d.noun_phrase()}{d.with_phrase()}."
        elif form == 1:
            shot, np_ = d.shot(), d.noun_phrase()
            verbs = d.verb_phrase(np_)
            front = rng.choice(("In the foreground", "In front"))
            text = f"{_cap(shot)} of {group}. " + (f"{front}, {np_} {verbs}." if verbs else f"{front} is {np_}.")
        elif form == 2:
            shot, np_ = d.shot(), d.noun_phrase()
            parts = d.parts_phrase()
            text = f"{_cap(shot)} of {group}, with {np_} in the foreground" + (f", {parts}." if parts else ".")
        elif form == 3:
            rest = rng.choice(("another person", "one other person")) if n == 2 else \
                rng.choice((f"{_count(n - 1)} other people", f"{_count(n - 1)} more people"))
            np_ = d.noun_phrase()
            body = d.with_phrase()
            text = f"{_cap(np_)}{body}; {rest} {'is' if n == 2 else 'are'} also in the {d.shot(article=False)}"
            if others:  # said here, as the list the sentence promises
                items = _list([_item(_Draft(o, [], rng, portrait=False)) for o in others], rng)
                text += f": {items}." if all_described else f", among them {items}."
                others = []
            else:
                text += "."
        else:
            shot, np_ = d.shot(article=False), d.noun_phrase()
            # "They" would read as the whole group: a person of unknown gender is named again.
            subject = f"the {d.p.noun}" if d.p.subject == "they" else d.subject()
            verbs = d.verb_phrase(subject)
            text = f"This {shot} shows {group}; the most prominent is {np_}." + \
                (f" {_cap(subject)} {verbs}." if verbs else "")
    return text + _others(d, n, others, all_described) + d.scene_tail()


def _checked(face: dict[str, Prediction], allowed: frozenset[str] | set[str]) -> dict[str, Prediction]:
    out = {}
    for name, prediction in face.items():
        spec = ATTRIBUTES.get(name)
        if spec is None:
            raise ValueError(f"unknown attribute {name!r}; known: {', '.join(ATTRIBUTES)}")
        if spec.kind == "category" and prediction.value not in spec.values:
            raise ValueError(f"{name}={prediction.value!r} is not in the vocabulary: {', '.join(spec.values)}")
        if name in allowed:
            out[name] = prediction
    return out


def compose_caption(faces: list[dict[str, Prediction]], n_faces: int, seed: int | str,
                    allowed: set[str] | frozenset[str] | None = None) -> str:
    """A caption for an image with `n_faces` faces, of which `faces` (primary first) were described:
    each a dict of confident attributes, possibly empty. The count is said ("three people", "a group
    of five people" when fewer were described), and every described face with something known is
    said: the primary one in full, the others without negatives or pose. Says only attributes in
    `allowed` (default: DEFAULT_ALLOWED). The same arguments always give the same caption."""
    if n_faces < max(1, len(faces)):
        raise ValueError(f"n_faces={n_faces} but {len(faces)} faces were described")
    allowed = DEFAULT_ALLOWED if allowed is None else allowed
    unknown = set(allowed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes in allowed: {', '.join(sorted(unknown))}")
    rng = random.Random(f"{seed}")
    faces = [_checked(face, allowed) for face in faces] or [{}]
    primary = _person(faces[0], rng)
    scene = [_SCENE[(name, faces[0][name].value)] for name in ("sharpness", "lighting", "resolution")
             if name in faces[0] and rng.random() < IMAGE_PHRASE_SHARE]
    draft = _Draft(primary, scene, rng, portrait=n_faces == 1)
    if n_faces == 1:
        text = _single(draft)
    else:
        others = [_person(face, rng, brief=True) for face in faces[1:]]
        text = _group(draft, n_faces, len(faces), [other for other in others if not other.empty])
    text = re.sub(r"\s+", " ", text).strip()
    return _cap(re.sub(r"\s+([,.;:])", r"\1", text))


def _words(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:['’-][a-z0-9]+)*", caption.lower())


def caption_stats(captions: list[str], attribute_counts: list[int] | None = None) -> dict:
    """Variety of a set of captions: vocabulary size, distinct-1 and distinct-2 (distinct n-grams
    over all n-grams, bigrams within a caption), length in words, the share of captions that
    repeat an earlier one exactly, and the mean of `attribute_counts` (the caller's count of
    attributes behind each caption; None when not given)."""
    tokens = [_words(c) for c in captions]
    unigrams = [w for t in tokens for w in t]
    bigrams = [pair for t in tokens for pair in zip(t, t[1:])]
    seen: set[str] = set()
    duplicates = 0
    for caption in captions:
        duplicates += caption in seen
        seen.add(caption)
    n = len(captions)
    return {
        "n": n,
        "vocabulary": len(set(unigrams)),
        "distinct_1": round(len(set(unigrams)) / len(unigrams), 4) if unigrams else 0.0,
        "distinct_2": round(len(set(bigrams)) / len(bigrams), 4) if bigrams else 0.0,
        "mean_words": round(len(unigrams) / n, 2) if n else 0.0,
        "max_words": max(map(len, tokens), default=0),
        "duplicate_share": round(duplicates / n, 4) if n else 0.0,
        "attributes_per_caption": round(sum(attribute_counts) / len(attribute_counts), 2) if attribute_counts else None,
    }


# How captions say attribute values, for reading them back. Each phrase maps to the values it
# states; hyphens and spaces match each other, and longer phrases win ("teenage girl" is a
# teenager, not a child; "without glasses" is no glasses). Every word the composer uses for a value
# is here (the tests check it), plus common paraphrases a rewriter may choose. Words more specific
# than the vocabulary ("sunglasses") map to values no composed caption has, so adding them fails.
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "gender=female": ("woman", "women", "lady", "ladies", "female", "females", "she", "her", "hers", "herself"),
    "gender=male": ("man", "men", "gentleman", "gentlemen", "guy", "guys", "male", "males", "he", "him", "his",
                    "himself"),
    "age_band=child": ("child", "children", "kid", "kids", "toddler", "toddlers", "baby", "babies", "infant",
                       "infants", "youngster"),
    "age_band=teenager": ("teenager", "teenagers", "teen", "teens", "teenage", "adolescent", "adolescents"),
    "age_band=young adult": ("young adult", "young adults", "young person", "young people", "youthful"),
    "age_band=adult": ("adult", "adults", "grown-up"),
    "age_band=middle-aged": ("middle-aged", "middle age", "midlife"),
    "age_band=senior": ("elderly", "senior", "seniors", "older", "pensioner", "old person", "old people"),
    "expression=happy": ("happy", "cheerful", "joyful", "joyous", "joy", "delighted", "glad"),
    "expression=sad": ("sad", "sadness", "sorrowful", "unhappy", "downcast", "melancholy", "gloomy", "upset"),
    "expression=angry": ("angry", "anger", "scowl", "scowls", "scowling", "annoyed", "furious", "irritated"),
    "expression=disgust": ("disgust", "disgusted", "repulsed"),
    "expression=fear": ("fear", "fearful", "frightened", "scared", "afraid", "terrified"),
    "expression=surprise": ("surprise", "surprised", "astonished", "astonishment", "amazed", "shocked", "startled",
                            "wide-eyed"),
    "expression=neutral": ("neutral", "blank expression", "expressionless", "straight face", "straight-faced",
                           "impassive", "deadpan", "calm", "serious"),
    "smiling=True": ("smile", "smiles", "smiling", "smiled", "grin", "grins", "grinning", "beam", "beams", "beaming"),
    "smiling=False": ("not smiling", "unsmiling", "without a smile", "no smile"),
    "mouth_open=True": ("open mouth", "mouth open", "open-mouthed", "parted lips", "lips parted", "agape"),
    "mouth_open=False": ("closed mouth", "mouth closed", "closed lips", "lips closed", "lips pressed together"),
    "hair_color=black": ("black", "raven"),
    "hair_color=brown": ("brown", "brunette", "chestnut"),
    "hair_color=blond": ("blond", "blonde", "fair hair", "fair-haired", "golden hair"),
    "hair_color=red": ("red", "ginger", "auburn", "redhead"),
    "hair_color=gray": ("gray", "grey", "silver", "graying", "greying", "salt-and-pepper"),
    "hair_color=white": ("white",),
    "hair_length=bald": ("bald", "balding", "shaved head"),
    "hair_length=short": ("short", "cropped", "crew cut", "buzz cut"),
    "hair_length=medium": ("medium-length", "shoulder-length", "mid-length", "chin-length"),
    "hair_length=long": ("long",),
    "bangs=True": ("bangs", "fringe"),
    "bangs=False": ("no bangs", "without bangs"),
    "eyeglasses=True": ("glasses", "eyeglasses", "spectacles", "specs", "bespectacled"),
    "eyeglasses=False": ("without glasses", "no glasses", "not wearing glasses", "without eyeglasses",
                         "no eyeglasses", "without spectacles"),
    "eyeglasses=sunglasses": ("sunglasses", "shades"),
    "hat=True": ("hat", "hats", "cap", "caps", "headwear", "beanie", "head covering"),
    "hat=False": ("no hat", "without a hat", "bareheaded", "hatless"),
    "earrings=True": ("earring", "earrings"),
    "earrings=False": ("no earrings", "without earrings"),
    "necklace=True": ("necklace", "necklaces", "pendant"),
    "necklace=False": ("no necklace", "without a necklace"),
    "beard=True": ("beard", "beards", "bearded", "facial hair", "stubble", "goatee", "mustache", "moustache"),
    "beard=False": ("clean-shaven", "beardless", "no beard", "without a beard"),
    "pose=frontal": ("facing the camera", "faces the camera", "face the camera", "facing forward", "faces forward",
                     "face forward", "frontal", "front-facing", "from the front", "front view", "front-on",
                     "head-on", "at the camera"),
    "pose=three-quarter": ("three-quarter", "turned slightly", "slightly turned", "half-turned", "angled",
                           "slightly away from the camera", "head turned"),
    "pose=profile": ("profile", "from the side", "side view", "side-view", "side-on", "sideways"),
    "pose=looking up": ("looking up", "looks up", "look up", "gazing up", "gazes up", "upward", "upwards",
                        "tilted up", "head up", "tilted back", "skyward"),
    "pose=looking down": ("looking down", "looks down", "look down", "gazing down", "gazes down", "downward",
                          "downwards", "tilted down", "head down", "lowered"),
    "sharpness=sharp": ("sharp", "sharply", "crisp", "in focus"),
    "sharpness=soft": ("soft", "softly focused"),
    "sharpness=blurry": ("blurry", "blurred", "blur", "out of focus", "fuzzy", "unfocused"),
    "lighting=well lit": ("well lit", "brightly lit", "evenly lit", "good light", "good lighting", "bright light",
                          "bright", "well illuminated"),
    "lighting=dim": ("dim", "dimly", "low light", "poorly lit", "dark", "darkly", "underexposed", "shadowy"),
    "lighting=overexposed": ("overexposed", "over-exposed", "washed out", "blown out"),
    "resolution=high resolution": ("high resolution", "high-res", "hi-res", "high definition", "hd", "hi-def"),
    "resolution=medium resolution": ("medium resolution", "mid resolution", "moderate resolution"),
    "resolution=low resolution": ("low resolution", "low-res", "pixelated", "pixellated"),
}
# Phrases that state two values at once, checked before their parts.
_COMPOUNDS: dict[str, tuple[str, ...]] = {
    "girl": ("age_band=child", "gender=female"),
    "girls": ("age_band=child", "gender=female"),
    "boy": ("age_band=child", "gender=male"),
    "boys": ("age_band=child", "gender=male"),
    "teenage girl": ("age_band=teenager", "gender=female"),
    "teen girl": ("age_band=teenager", "gender=female"),
    "teenage boy": ("age_band=teenager", "gender=male"),
    "teen boy": ("age_band=teenager", "gender=male"),
    "young woman": ("age_band=young adult", "gender=female"),
    "young women": ("age_band=young adult", "gender=female"),
    "young lady": ("age_band=young adult", "gender=female"),
    "young man": ("age_band=young adult", "gender=male"),
    "young men": ("age_band=young adult", "gender=male"),
    "young guy": ("age_band=young adult", "gender=male"),
    "young gentleman": ("age_band=young adult", "gender=male"),
    "old woman": ("age_band=senior", "gender=female"),
    "old lady": ("age_band=senior", "gender=female"),
    "old man": ("age_band=senior", "gender=male"),
    "old gentleman": ("age_band=senior", "gender=male"),
}
_DECADE_PATTERN = "|".join(_DECADE_WORDS.values()) + r"|[2-9]0'?s"


def _normal(phrase: str) -> str:
    return re.sub(r"[\s-]+", " ", phrase.lower()).strip()


@functools.cache
def _phrase_table() -> tuple[re.Pattern, dict[str, frozenset[str]]]:
    table: dict[str, set[str]] = {}
    for key, phrases in _SYNONYMS.items():
        for phrase in phrases:
            table.setdefault(_normal(phrase), set()).add(key)
    for phrase, keys in _COMPOUNDS.items():
        table[_normal(phrase)] = set(keys)
    # Longest first: at each position the alternation takes the first phrase that matches.
    phrases = sorted(table, key=len, reverse=True)
    alternatives = [r"[\s-]+".join(map(re.escape, p.split())) for p in phrases]
    pattern = re.compile(
        r"(?<![a-z0-9])(?:"
        r"(?P<exact>\d+)[\s-]*(?:years?|yrs?)[\s-]*old"
        rf"|(?P<qual>early|mid|late)[\s-]*(?P<qdec>{_DECADE_PATTERN})"
        rf"|(?P<dec>{_DECADE_PATTERN})"
        rf"|{'|'.join(alternatives)}"
        r")(?![a-z0-9])"
    )
    return pattern, {p: frozenset(k) for p, k in table.items()}


def _decade(word: str) -> str:
    digits = re.match(r"(\d0)'?s", word)
    if digits:
        return f"{digits[1]}s"
    return f"{next(d for d, w in _DECADE_WORDS.items() if w == word)}s"


def attribute_words(caption: str) -> set[str]:
    """The attribute values a caption states, as "name=value" ("gender=female", "eyeglasses=True",
    "age=30s"), read through the synonym table. Only what is written counts: "a man" states
    gender=male and nothing about his age."""
    pattern, table = _phrase_table()
    found: set[str] = set()
    for m in pattern.finditer(caption.lower().replace("’", "'")):
        if m["exact"]:
            found.add(f"age={m['exact']}")  # an exact age is more than any composed caption says
        elif m["qual"]:
            found.add(f"age={m['qual']} {_decade(m['qdec'])}")
        elif m["dec"]:
            found.add(f"age={_decade(m['dec'])}")
        else:
            found |= table[_normal(m[0])]
    return found


def face_words(face: dict[str, Prediction]) -> set[str]:
    """The attribute values a caption may state about this face, in `attribute_words` form. An age
    gives its decade, or under 20 the child/teenager band the composer says instead."""
    words = set()
    for name, prediction in face.items():
        kind = ATTRIBUTES[name].kind
        if kind == "number":
            age = float(prediction.value)
            if 20 <= age < 100:
                words.add(f"age={int(age) // 10 * 10}s")
            elif age < 20:
                words.add(f"age_band={'child' if age < 13 else 'teenager'}")
        elif kind == "bool":
            words.add(f"{name}={bool(prediction.value)}")
        else:
            words.add(f"{name}={prediction.value}")
    return words


# Capitalised words that may open a sentence of a caption without being a name.
_SENTENCE_STARTERS = frozenset((
    "a an the this that these those here there it its in on at with without wearing looking smiling seen shown "
    "pictured captured photographed taken close-up closeup portrait photo photograph picture image shot snapshot "
    "headshot one two three four five six seven eight nine ten eleven twelve several many some both each another "
    "other group person people someone somebody face faces front foreground beside next behind among all also "
    "and but while as young little she he they her his their we you what"
).split())


def _name_like(text: str, known: set[str]) -> set[str]:
    """Capitalised words that could be names: any capitalised word inside a sentence, and a
    sentence's first word unless it is a common sentence opener or a known caption word."""
    found = set()
    for m in re.finditer(r"(?<![\w'’-])[A-Z][A-Za-z'’-]*[A-Za-z]", text):
        word = m[0]
        before = text[: m.start()].rstrip()
        opens_sentence = not before or before[-1] in ".!?:;\"'(“"
        base = re.sub(r"['’]s$", "", word).lower()
        if not opens_sentence or (base not in _SENTENCE_STARTERS and base not in known):
            found.add(word)
    return found


@functools.cache
def _caption_vocabulary() -> frozenset[str]:
    return frozenset(w for phrases in (*_SYNONYMS.values(), tuple(_COMPOUNDS)) for p in phrases for w in _words(p))


def rewrite_keeps_attributes(faces: list[dict[str, Prediction]], composed: str, rewritten: str) -> bool:
    """True when `rewritten` states exactly the attribute values `composed` states (synonyms
    allowed), none beyond what `faces` support, and no name-like word that `composed` lacks."""
    said = attribute_words(rewritten)
    if said != attribute_words(composed):
        return False
    # The composer never says more than the faces; a caption from elsewhere might.
    if not said <= set().union(*map(face_words, faces)):
        return False
    composed_words = set(re.findall(r"[A-Za-z'’-]+", composed))
    known = set(_words(composed)) | _caption_vocabulary()
    return not (_name_like(rewritten, known) - composed_words)


class Rewriter(Protocol):
    def rewrite(self, caption: str) -> str: ...


REWRITE_PROMPT = (
    "Rewrite this description of a photo in your own words, in one or two sentences. Keep every "
    "detail, add nothing, and do not name anyone.\nDescription: {caption}\nRewrite:"
)


class TransformersRewriter:
    """A local transformers model (seq2seq such as T5, or a causal/chat model) that rewrites
    captions greedily. Loaded from `model_path` only, on first use.

    The models are driven through generate() rather than a pipeline: transformers 5 removed the
    text2text-generation pipeline, and this works the same on 4.x and 5.x."""

    def __init__(self, model_path: str | Path, max_new_tokens: int = 96):
        self.model_path = Path(model_path)
        self.max_new_tokens = max_new_tokens
        self._loaded = None

    def load(self) -> None:
        if self._loaded is not None:
            return
        try:
            import torch

            from facedata.core.torchvision_compat import ensure_torchvision

            ensure_torchvision()  # transformers imports torchvision: see that module
            import transformers
        except ImportError as e:
            raise UserError(f"captions.rewriter_model {self.model_path}: rewriting captions needs the "
                            f"'{e.name}' package, which is not installed (pip install 'facedata[rewriter]')") from None
        if not (self.model_path / "config.json").is_file():
            raise UserError(f"{self.model_path / 'config.json'}: not found; captions.rewriter_model must be a local "
                            "transformers model folder")
        config = transformers.AutoConfig.from_pretrained(self.model_path, local_files_only=True)
        seq2seq = bool(config.is_encoder_decoder)
        auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        model = auto.from_pretrained(self.model_path, local_files_only=True).eval()
        self._loaded = (torch, tokenizer, model, seq2seq)

    def rewrite(self, caption: str) -> str:
        self.load()
        torch, tokenizer, model, seq2seq = self._loaded
        prompt = REWRITE_PROMPT.format(caption=caption)
        chat = not seq2seq and getattr(tokenizer, "chat_template", None)
        if chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0] if seq2seq else out[0, inputs["input_ids"].shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        return text.split("\n")[0].strip().strip('"“”')


@functools.lru_cache(maxsize=2)
def load_rewriter(model_path: str) -> TransformersRewriter:
    """The rewriter for `model_path`, loaded now (so a missing package or folder fails before any
    work) and once per process."""
    rewriter = TransformersRewriter(model_path)
    rewriter.load()
    return rewriter


def rewrite_caption(rewriter: Rewriter, faces: list[dict[str, Prediction]], composed: str) -> tuple[str, bool]:
    """(the rewrite, True) when the guard accepts it, else (the composed caption, False)."""
    rewritten = " ".join(rewriter.rewrite(composed).split())
    if rewritten and rewrite_keeps_attributes(faces, composed, rewritten):
        return rewritten, True
    return composed, False
