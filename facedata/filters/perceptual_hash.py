"""A perceptual hash per image as columns, for the run-wide duplicate step and benchmark
decontamination (facedata.filters.duplicates, facedata.filters.decontaminate).

`phash` is imagehash's 64-bit pHash of the whole image (16 hex digits): re-encoding at JPEG quality
30 or halving the size moves it by at most 2 bits on the project's photos, distinct photos sit 10+
bits apart (1st percentile). pHash is global, so a 5-10% crop moves it by 10-36 bits: `phash_crops`
adds the hashes of 18 crops (90% and 95% of each side, at 9 anchor positions), and a crop of another
image lands within a few bits of one of them. Measured on openpeople: random crops of up to 10% per
side are found at radius 8 with the crop hashes, 3% without.

pHash matches images by their layout; photos taken in one studio setup (same backdrop, pose and
framing, different people) can fall within the radius too, which is what duplicates.verify_pair's
local-feature check is for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field
from PIL import Image

from facedata.core import records
from facedata.filters._images import decode_rgb, package_version
from facedata.core.step import ShardStep, StepOutput

HASH_BITS = 64
CROP_SCALES = (0.95, 0.9)
CROP_ANCHORS = (0.0, 0.5, 1.0)
# pHash downsizes to 32x32 before its DCT: decoding beyond this only costs time.
HASH_INPUT_SIDE = 256


def phash_bits(image: Image.Image) -> np.ndarray:
    """The 64-bit pHash as 64 booleans (imagehash's bit order)."""
    import imagehash

    return np.asarray(imagehash.phash(image, hash_size=8).hash, dtype=bool).ravel()


def bits_to_hex(bits: np.ndarray) -> str:
    return np.packbits(bits).tobytes().hex()


def hex_to_bytes(hashes: list[str]) -> np.ndarray:
    """(n, 8) uint8: hex hashes packed the way faiss' binary indexes take them."""
    if not hashes:
        return np.zeros((0, HASH_BITS // 8), dtype=np.uint8)
    return np.frombuffer(bytes.fromhex("".join(hashes)), dtype=np.uint8).reshape(len(hashes), HASH_BITS // 8).copy()


def crops(image: Image.Image) -> list[Image.Image]:
    w, h = image.size
    out = []
    for scale in CROP_SCALES:
        cw, ch = w * scale, h * scale
        for ax in CROP_ANCHORS:
            for ay in CROP_ANCHORS:
                x, y = (w - cw) * ax, (h - ch) * ay
                out.append(image.crop((round(x), round(y), round(x + cw), round(y + ch))))
    return out


def image_hashes(data: bytes, with_crops: bool = True) -> tuple[str, list[str]]:
    """(pHash of the whole image, pHashes of its crops) as hex, from encoded image bytes."""
    image = decode_rgb(data, HASH_INPUT_SIDE)
    whole = bits_to_hex(phash_bits(image))
    return whole, [bits_to_hex(phash_bits(c)) for c in crops(image)] if with_crops else []


class PerceptualHash(ShardStep):
    """Adds `phash` (and `phash_crops`) to every kept image; drops nothing but images that cannot be
    decoded."""

    name = "phash"
    version = 1
    needs_images = True
    reasons = {"phash_unreadable": "the image bytes could not be decoded for hashing"}
    columns = {"phash": pa.string(), "phash_crops": pa.list_(pa.string())}

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        # Off: 18 fewer hashes per image (~60% of this step's time), crops are no longer found.
        crop_hashes: bool = True
        # Reserved for future hash kinds; only pHash-64 for now, named so a run records what it used.
        kind: str = Field("phash64", pattern="^phash64$")

    def models(self) -> dict[str, dict]:
        return {"perceptual_hash": {"name": "pHash 64-bit (imagehash)", "version": package_version("imagehash"),
                                    "licence": "BSD-2-Clause", "source": "imagehash package (an algorithm, no weights)"}}

    def process(self, rows: list[dict], images: Callable[[], Iterator[tuple[str, bytes]]] | None) -> StepOutput:
        index = {row["key"]: i for i, row in enumerate(rows) if row["status"] == records.OK}
        out = StepOutput(columns={"phash": [None] * len(rows), "phash_crops": [None] * len(rows)},
                         reasons=[None] * len(rows))
        for key, data in images() if images is not None else ():
            i = index.get(key)
            if i is None:
                continue
            try:
                whole, crop_hashes = image_hashes(data, self.options.crop_hashes)
            except Exception:  # noqa: BLE001 - any decoder error means this image cannot be hashed
                out.reasons[i] = "phash_unreadable"
                continue
            out.columns["phash"][i] = whole
            out.columns["phash_crops"][i] = crop_hashes
        return out
