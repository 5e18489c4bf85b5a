"""Zero-shot prompts for facedata's attribute vocabulary, and attribute labels from published metadata.

`PROMPTS` describes each class of each category/bool attribute by several phrasings filled into
several templates (CLIP's prompt ensembling); `attribute_labels` reads the primary face's published
values from a sample's KEY.json.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from facedata.attributes.vocabulary import ATTRIBUTES

__all__ = ["PROMPTS", "PromptSet", "attribute_labels", "class_names", "prompts_for"]


@dataclass(frozen=True)
class PromptSet:
    """Zero-shot prompts of one attribute: every template is filled with every phrase of a class."""

    templates: tuple[str, ...]
    classes: dict[str, tuple[str, ...]]  # class value ("true"/"false" for a bool) -> phrases


_PERSON = ("a photo of {}.", "a close-up photo of {}.", "a portrait of {}.", "an image of {}.", "the face of {}.")
_LOOKS = ("a face of a person who looks {}.", "a photo of a person looking {}.", "a close-up of a {} face.",
          "a photo of a {} person.")
_SHOT = ("a {} photo of a person.", "a {} close-up of a face.", "a {} portrait.", "a {} picture of someone.")

# Phrasings follow the words facedata captions use (facedata.captions.compose), so a model trained on them
# has seen them; several per class, averaged as CLIP's prompt ensembles are.
PROMPTS: dict[str, PromptSet] = {
    "gender": PromptSet(_PERSON[:4], {
        "female": ("a woman", "a lady", "a female face"), "male": ("a man", "a gentleman", "a male face")}),
    "age_band": PromptSet(_PERSON, {
        "child": ("a child", "a kid", "a young child"), "teenager": ("a teenager", "a teen"),
        "young adult": ("a young adult", "a young person in their twenties"),
        "adult": ("an adult", "an adult in their thirties"),
        "middle-aged": ("a middle-aged person", "a person in their fifties"),
        "senior": ("an elderly person", "an older person", "a senior")}),
    "expression": PromptSet(_LOOKS, {
        "angry": ("angry",), "disgust": ("disgusted",), "fear": ("frightened", "scared"),
        "happy": ("happy", "cheerful"), "sad": ("sad", "unhappy"), "surprise": ("surprised", "astonished"),
        "neutral": ("expressionless", "calm", "straight-faced")}),
    "smiling": PromptSet(_PERSON, {
        "true": ("a smiling person", "a person with a smile", "a grinning person"),
        "false": ("a person who is not smiling", "an unsmiling person", "a person with a straight face")}),
    "mouth_open": PromptSet(_PERSON, {
        "true": ("a person with an open mouth", "an open-mouthed person", "a person with parted lips"),
        "false": ("a person with a closed mouth", "a person with closed lips")}),
    "hair_color": PromptSet(_PERSON, {
        c: tuple(f"a person with {w} hair" for w in words)
        for c, words in {"black": ("black", "jet-black"), "brown": ("brown", "chestnut-brown"),
                         "blond": ("blond", "blonde"), "red": ("red", "ginger"), "gray": ("gray", "grey"),
                         "white": ("white",)}.items()}),
    "hair_length": PromptSet(_PERSON, {
        "bald": ("a bald person", "a person with no hair"),
        "short": ("a person with short hair", "a person with close-cropped hair"),
        "medium": ("a person with medium-length hair", "a person with shoulder-length hair"),
        "long": ("a person with long hair",)}),
    "bangs": PromptSet(_PERSON, {"true": ("a person with bangs", "a person with a fringe"),
                                 "false": ("a person without bangs", "a person with no fringe")}),
    "eyeglasses": PromptSet(_PERSON, {
        "true": ("a person wearing glasses", "a person with eyeglasses", "a bespectacled person"),
        "false": ("a person without glasses", "a person wearing no glasses")}),
    "hat": PromptSet(_PERSON, {"true": ("a person wearing a hat", "a person in a hat"),
                               "false": ("a person without a hat", "a bareheaded person")}),
    "earrings": PromptSet(_PERSON, {"true": ("a person wearing earrings", "a person with earrings"),
                                    "false": ("a person without earrings", "a person wearing no earrings")}),
    "necklace": PromptSet(_PERSON, {"true": ("a person wearing a necklace", "a person with a necklace"),
                                    "false": ("a person without a necklace", "a person wearing no necklace")}),
    "beard": PromptSet(_PERSON, {"true": ("a person with a beard", "a bearded person"),
                                 "false": ("a clean-shaven person", "a person without a beard")}),
    "pose": PromptSet(_PERSON, {
        "frontal": ("a person facing the camera", "a person seen from the front"),
        "three-quarter": ("a person turned slightly to one side", "a person in three-quarter view"),
        "profile": ("a person in profile", "a person seen from the side"),
        "looking up": ("a person looking up", "a person gazing upward"),
        "looking down": ("a person looking down", "a person gazing downward")}),
    "sharpness": PromptSet(_SHOT, {"sharp": ("sharp", "crisp", "in-focus"), "soft": ("slightly soft", "soft-focus"),
                                   "blurry": ("blurry", "blurred", "out-of-focus")}),
    "lighting": PromptSet(_SHOT, {"well lit": ("well-lit", "brightly lit", "evenly lit"),
                                  "dim": ("dim", "dimly lit", "low-light"),
                                  "overexposed": ("overexposed", "washed-out")}),
    "resolution": PromptSet(_SHOT, {"high resolution": ("high-resolution", "hi-res"),
                                    "medium resolution": ("medium-resolution", "mid-resolution"),
                                    "low resolution": ("low-resolution", "pixelated", "low-res")}),
}


_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiou])")  # "a angry face" -> "an angry face"


def class_names(attribute: str) -> list[str]:
    """An attribute's classes as label strings: its vocabulary values, or false/true for a bool."""
    spec = ATTRIBUTES[attribute]
    return ["false", "true"] if spec.kind == "bool" else list(spec.values)


def prompts_for(attribute: str) -> dict[str, list[str]]:
    """class -> the prompts describing it (every template filled with every phrase)."""
    ps = PROMPTS[attribute]
    return {c: [_ARTICLE.sub(r"\1n ", t.format(p)) for t in ps.templates for p in ps.classes[c]]
            for c in class_names(attribute)}


def _label(value: Any, kind: str) -> str | None:
    if value is None:
        return None
    if kind == "bool":
        return "true" if bool(value) else "false"
    return str(value)


def attribute_labels(meta: dict[str, Any], attributes: Sequence[str], min_confidence: float = 0.0) -> dict[str, str]:
    """The primary face's confident attribute values in a sample's published metadata, as label
    strings ("true"/"false" for bools). A value the publisher left null (not confident) is absent,
    and so is one whose confidence is under min_confidence."""
    faces = meta.get("faces") or []
    face = next((f for f in faces if isinstance(f, dict) and f.get("primary")), None)
    if face is None and len(faces) == 1 and isinstance(faces[0], dict):
        face = faces[0]
    if not isinstance(face, dict):
        return {}
    values = face.get("attributes") or face.get("values") or {}
    confidences = face.get("confidences") or {}
    out = {}
    for name in attributes:
        label = _label(values.get(name), ATTRIBUTES[name].kind)
        conf = confidences.get(name)
        if label is None or (min_confidence > 0 and (conf is None or conf < min_confidence)):
            continue
        if label in class_names(name):
            out[name] = label
    return out
