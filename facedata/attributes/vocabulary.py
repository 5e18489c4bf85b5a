"""The attribute vocabulary: every name a predictor may produce, its kind and allowed values.

Kept apart from the models so the config can check attribute names without loading any.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttributeSpec:
    kind: str  # "category" (a string from `values`), "bool" or "number"
    values: tuple[str, ...] = ()
    celeba: tuple[str, ...] = ()  # the CelebA-40 attributes this covers


# The whole vocabulary. A predictor may only produce these names and values; the caption
# composer and the published schema are built from this table.
ATTRIBUTES: dict[str, AttributeSpec] = {
    "age": AttributeSpec("number"),
    "age_band": AttributeSpec("category", ("child", "teenager", "young adult", "adult", "middle-aged", "senior"), ("Young",)),
    "gender": AttributeSpec("category", ("female", "male"), ("Male",)),
    "expression": AttributeSpec("category", ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")),
    "smiling": AttributeSpec("bool", celeba=("Smiling",)),
    "mouth_open": AttributeSpec("bool", celeba=("Mouth_Slightly_Open",)),
    "hair_color": AttributeSpec("category", ("black", "brown", "blond", "red", "gray", "white"),
                                ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair")),
    "hair_length": AttributeSpec("category", ("bald", "short", "medium", "long"), ("Bald",)),
    "bangs": AttributeSpec("bool", celeba=("Bangs",)),
    "eyeglasses": AttributeSpec("bool", celeba=("Eyeglasses",)),
    "hat": AttributeSpec("bool", celeba=("Wearing_Hat",)),
    "earrings": AttributeSpec("bool", celeba=("Wearing_Earrings",)),
    "necklace": AttributeSpec("bool", celeba=("Wearing_Necklace",)),
    "beard": AttributeSpec("bool", celeba=("No_Beard",)),
    "pose": AttributeSpec("category", ("frontal", "three-quarter", "profile", "looking up", "looking down")),
    "sharpness": AttributeSpec("category", ("sharp", "soft", "blurry"), ("Blurry",)),
    "lighting": AttributeSpec("category", ("well lit", "dim", "overexposed")),
    "resolution": AttributeSpec("category", ("high resolution", "medium resolution", "low resolution")),
}
