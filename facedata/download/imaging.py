"""Image stage: decode, normalise to RGB, filter by size, and choose the bytes to store.

Cheap checks come first: the pixel budget, shorter side and aspect ratio are judged from the
header (`Image.open` is lazy), so bombs and thumbnails are rejected without decoding them.
Downloaded bytes are stored unchanged when they already are a plain JPEG/PNG/WEBP that needs no
change; otherwise the image is re-encoded as JPEG.

Safe under a thread pool: every call gets its own limit; Pillow's process-wide
`Image.MAX_IMAGE_PIXELS` is never changed. That global still applies on top of ours: an image
over twice it fails inside Pillow and is reported as decompression_bomb too.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import NamedTuple

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from facedata.core import records
from facedata.core.config import ImageConfig

# Formats whose bytes we store as downloaded, and the extension they are stored under.
_STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# EXIF orientations that rotate by 90 or 270 degrees, so width and height swap.
_SWAPS_SIDES = {5, 6, 7, 8}
# EXIF orientations that ImageOps.exif_transpose acts on (any other value is ignored by it).
_TRANSPOSES = {2, 3, 4, 5, 6, 7, 8}
# Modes whose ICC profile, if any, describes RGB data (so it still fits after conversion to RGB).
_RGB_PROFILE_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "P", "PA"}


class ImageError(Exception):
    """Bytes that cannot become an RGB image; `status` is the records status to report."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ImageResult:
    status: str  # records.OK, DECODE_ERROR, DECOMPRESSION_BOMB, TOO_SMALL, BAD_ASPECT or NOT_IMAGE
    error: str | None  # one line, None when OK
    data: bytes | None  # bytes to store; None unless OK
    ext: str | None  # "jpg" | "png" | "webp": the stored format
    width: int | None  # stored size (after orientation and resize)
    height: int | None
    # Decoded size after EXIF orientation. For too_small / bad_aspect: the header's size (those
    # checks do not depend on orientation, so the image is never decoded).
    orig_width: int | None
    orig_height: int | None
    sha256: str | None  # of the downloaded bytes, for exact-duplicate detection


class _Decoded(NamedTuple):
    image: Image.Image  # RGB, oriented
    orientation: int  # EXIF orientation of the source (1 when absent)
    converted: bool  # the source mode was not RGB


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300]


def _orientation(img: Image.Image) -> int:
    return img.getexif().get(ExifTags.Base.Orientation, 1)


def _open(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """Identify the image and read its header; refuse more than `max_pixels` before decoding."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(records.NOT_IMAGE, "Pillow recognises no image format in the bytes") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(records.DECOMPRESSION_BOMB, _one_line(err)) from None
    except Exception as err:  # Pillow's plugins raise many types on malformed headers
        raise ImageError(records.DECODE_ERROR, _one_line(err)) from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            records.DECOMPRESSION_BOMB,
            f"{width}x{height} is {width * height} pixels, over max_pixels {max_pixels}",
        )
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        # 16/32-bit grey: Pillow's own conversion clips at 255, so scale 0..65535 onto 0..255.
        img = img.convert("I").point(lambda v: v / 257).convert("L")
    if img.has_transparency_data:
        # Composite onto white: transparent pixels have arbitrary (often black) colour values.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, "white")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _load_rgb(img: ImageFile.ImageFile, draft_size: tuple[int, int] | None) -> _Decoded:
    """Decode an opened image fully, apply its EXIF orientation and convert it to RGB."""
    try:
        if draft_size and img.format == "JPEG":
            # JPEG can decode at 1/2, 1/4 or 1/8 scale, far faster; the EXIF is in the header.
            if _orientation(img) in _SWAPS_SIDES:
                draft_size = (draft_size[1], draft_size[0])
            img.draft(None, draft_size)
        img.load()
        orientation = _orientation(img)
        ImageOps.exif_transpose(img, in_place=True)
        converted = img.mode != "RGB"
        return _Decoded(_to_rgb(img), orientation, converted)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(records.DECOMPRESSION_BOMB, _one_line(err)) from None
    except Exception as err:  # truncated or corrupt data surfaces as OSError, ValueError, ...
        raise ImageError(records.DECODE_ERROR, _one_line(err)) from None


def decode_rgb(data: bytes, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `data` to an oriented RGB image; raises ImageError (with its status) on bad bytes.

    `draft_size` (width, height after orientation) lets JPEGs decode at a reduced scale that is
    still at least that large; other formats decode at full size.
    """
    return _load_rgb(_open(data, max_pixels), draft_size).image


def _fit(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """The size that brings the longer side down to `max_side`; None when no downscale is needed."""
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _encode_jpeg(img: Image.Image, quality: int, icc_profile: bytes | None) -> bytes:
    buf = io.BytesIO()
    # EXIF is not carried over: its orientation is already applied and its thumbnail is stale.
    img.save(buf, "JPEG", quality=quality, icc_profile=icc_profile)
    return buf.getvalue()


def process_image(data: bytes, cfg: ImageConfig) -> ImageResult:
    """Decode, check and prepare one downloaded image for storage. Never raises on bad bytes."""
    sha256 = hashlib.sha256(data).hexdigest()

    def rejected(status: str, error: str, size: tuple[int, int] | None = None) -> ImageResult:
        w, h = size or (None, None)
        return ImageResult(status, error, None, None, None, None, w, h, sha256)

    try:
        img = _open(data, cfg.max_pixels)
    except ImageError as err:
        return rejected(err.status, str(err))
    # Shorter side and aspect ratio are the same whichever way the image is rotated, so the
    # header's size decides them before any decoding.
    width, height = img.size
    short, long = min(width, height), max(width, height)
    if short < cfg.min_side:
        return rejected(records.TOO_SMALL, f"{width}x{height}: shorter side under {cfg.min_side}", img.size)
    if long / short > cfg.max_aspect:
        return rejected(
            records.BAD_ASPECT, f"{width}x{height}: aspect {long / short:.2f} over {cfg.max_aspect}", img.size
        )

    target = _fit(width, height, cfg.resize_max_side)
    source_format, source_mode = img.format, img.mode
    animated = getattr(img, "is_animated", False)
    icc_profile = img.info.get("icc_profile") if source_mode in _RGB_PROFILE_MODES else None
    if target:
        # A square draft request of the target's shorter side works in either orientation.
        draft = (math.ceil(short * cfg.resize_max_side / long),) * 2
    elif (
        source_format == "JPEG"
        and source_mode == "RGB"
        and cfg.reencode == "never"
        and _orientation(img) not in _TRANSPOSES
    ):
        # These bytes will be stored as downloaded, so the decode only has to prove they decode.
        # At 1/8 scale libjpeg still entropy-decodes every block (truncated or corrupt data fails
        # just the same) but skips most of the inverse DCT and colour work: ~35% less CPU.
        draft = (1, 1)
    else:
        draft = None
    try:
        decoded = _load_rgb(img, draft)
    except ImageError as err:
        return rejected(err.status, str(err))

    orig_size = (height, width) if decoded.orientation in _SWAPS_SIDES else (width, height)
    rgb = decoded.image
    if target:
        if decoded.orientation in _SWAPS_SIDES:
            target = (target[1], target[0])
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)

    ext = _STORED_FORMATS.get(source_format or "")
    keep_bytes = (
        ext is not None
        and cfg.reencode == "never"
        and target is None
        and decoded.orientation not in _TRANSPOSES
        and not decoded.converted
        and not animated  # store the still frame we checked, not an animation
    )
    if keep_bytes:
        # Unresized and unrotated: the stored size is the source's (`rgb` may be a 1/8 draft).
        stored, size = data, orig_size
    else:
        stored, ext, size = _encode_jpeg(rgb, cfg.jpeg_quality, icc_profile), "jpg", rgb.size
    return ImageResult(records.OK, None, stored, ext, *size, *orig_size, sha256)
