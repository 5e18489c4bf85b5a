"""The image stage and the contact sheet, on real photos (openpeople JPEGs, scikit-image PNGs)."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import openpeople_photos, package_dir
from PIL import ExifTags, Image, ImageFont

from facedata.core import records
from facedata.core.config import ImageConfig
from facedata.report.contact_sheet import _wrap, make_contact_sheet
from facedata.download.imaging import ImageError, decode_rgb, process_image

SKIMAGE = package_dir("skimage") / "data"
SELFIE = next(p for p in openpeople_photos() if p.stem == "amateur_selfie")  # 1696 x 2528
PORTRAIT = next(p for p in openpeople_photos() if p.stem == "studio_portrait")  # 2048 x 2048


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def small(img: Image.Image, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize(size, Image.Resampling.BOX), dtype=np.float64)


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    with Image.open(SKIMAGE / "coffee.png") as img:  # 600 x 400 RGB
        return img.convert("RGB")


@pytest.fixture(scope="module")
def selfie_small() -> Image.Image:
    """The selfie at 424 x 632: portrait orientation, quick to decode."""
    with Image.open(SELFIE) as img:
        return img.reduce(4)


# ----------------------------------------------------------------------------- ok path


@pytest.mark.parametrize(
    "path, ext, size",
    [(PORTRAIT, "jpg", (2048, 2048)), (SELFIE, "jpg", (1696, 2528)), (SKIMAGE / "astronaut.png", "png", (512, 512))],
    ids=["portrait.jpg", "selfie.jpg", "astronaut.png"],
)
def test_ok_stores_original_bytes_and_records_sizes(path: Path, ext: str, size: tuple[int, int]):
    data = path.read_bytes()
    result = process_image(data, ImageConfig())
    assert result.status == records.OK and result.error is None
    assert result.data == data
    assert result.ext == ext
    assert (result.width, result.height) == (result.orig_width, result.orig_height) == size
    assert result.sha256 == hashlib.sha256(data).hexdigest()


def test_ok_webp_is_stored_as_webp(coffee):
    data = encode(coffee, "WEBP", quality=80)
    result = process_image(data, ImageConfig())
    assert (result.status, result.ext, result.width, result.height) == (records.OK, "webp", 600, 400)
    assert result.data == data


# ----------------------------------------------------------------------------- EXIF orientation


@pytest.fixture(scope="module")
def rotated_jpeg(selfie_small) -> bytes:
    """The selfie stored sideways (632 x 424 pixels) with EXIF orientation 6: 'rotate 90 CW to view'."""
    sideways = selfie_small.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return encode(sideways, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied_and_reencoded(rotated_jpeg, selfie_small):
    result = process_image(rotated_jpeg, ImageConfig())
    assert result.status == records.OK
    assert (result.width, result.height) == (result.orig_width, result.orig_height) == (424, 632)
    assert result.ext == "jpg" and result.data != rotated_jpeg
    with Image.open(io.BytesIO(result.data)) as stored:
        assert stored.size == (424, 632)
        assert stored.getexif().get(ExifTags.Base.Orientation, 1) == 1  # viewers must not rotate again
        upright = small(stored)
    assert mean_diff(upright, small(selfie_small)) < 4
    # The check can fail: the wrong rotation is far off.
    assert mean_diff(upright, small(selfie_small.transpose(Image.Transpose.ROTATE_180))) > 20


def test_exif_orientation_with_resize_and_draft(rotated_jpeg, selfie_small):
    result = process_image(rotated_jpeg, ImageConfig(resize_max_side=316))
    assert (result.status, result.width, result.height) == (records.OK, 212, 316)
    assert (result.orig_width, result.orig_height) == (424, 632)
    assert mean_diff(small(Image.open(io.BytesIO(result.data))), small(selfie_small)) < 5

    # draft_size is in upright coordinates: at least 150 x 100 upright needs a 1/2-scale decode.
    # Applied to the stored 632 x 424 pixels as they lie, it would allow 1/4 scale: 106 x 158 upright.
    img = decode_rgb(rotated_jpeg, 10**8, draft_size=(150, 100))
    assert img.mode == "RGB" and img.size == (212, 316)
    assert mean_diff(small(img), small(selfie_small)) < 5


# ----------------------------------------------------------------------------- modes -> RGB


def test_cmyk_jpeg(coffee):
    data = encode(coffee.convert("CMYK"), "JPEG", quality=95)
    result = process_image(data, ImageConfig())
    assert (result.status, result.ext, result.width, result.height) == (records.OK, "jpg", 600, 400)
    assert result.data != data
    assert mean_diff(pixels(result.data), np.asarray(coffee, dtype=np.float64)) < 4


def test_palette_png_with_transparency_is_composited_on_white(coffee):
    pal = coffee.quantize(255)  # indices 0..254; 255 becomes the transparent one
    pal.putpalette(pal.getpalette()[: 255 * 3] + [0, 0, 0])
    pal.paste(255, (0, 0, 300, 400))  # left half transparent (black underneath)
    data = encode(pal, "PNG", transparency=255)
    result = process_image(data, ImageConfig())
    assert (result.status, result.ext, result.width, result.height) == (records.OK, "jpg", 600, 400)
    stored = pixels(result.data)
    assert stored[:, :290].mean() > 250
    assert mean_diff(stored[:, 310:], np.asarray(coffee, dtype=np.float64)[:, 310:]) < 10


def test_rgba_png_is_composited_on_white(coffee):
    rgba = coffee.convert("RGBA")
    alpha = np.full((400, 600), 255, dtype=np.uint8)
    alpha[:200] = 0  # top half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    rgba.paste((0, 0, 0, 0), (0, 0, 600, 200))
    result = process_image(encode(rgba, "PNG"), ImageConfig())
    assert (result.status, result.ext) == (records.OK, "jpg")
    stored = pixels(result.data)
    assert stored[:190].mean() > 250
    assert mean_diff(stored[210:], np.asarray(coffee, dtype=np.float64)[210:]) < 4


def test_16_bit_grayscale_png_uses_the_full_8_bit_range():
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (256, 1))
    img16 = Image.fromarray(gradient)
    assert img16.mode == "I;16"
    data = encode(img16, "PNG")
    rgb = np.asarray(decode_rgb(data, 10**8))
    assert rgb.shape == (256, 256, 3)
    assert rgb.min() == 0 and rgb.max() == 255
    assert np.abs(rgb[0, :, 0].astype(int) - np.arange(256)).max() <= 1  # 0..65535 -> 0..255
    assert process_image(data, ImageConfig()).status == records.OK

    # A real photo widened to 16 bits comes back as itself, not clipped to white.
    with Image.open(SKIMAGE / "camera.png") as camera:
        camera8 = np.asarray(camera)
    photo16 = encode(Image.fromarray(camera8.astype(np.uint16) * 257), "PNG")
    result = process_image(photo16, ImageConfig())
    assert (result.status, result.ext) == (records.OK, "jpg")
    assert mean_diff(pixels(result.data)[..., 1], camera8.astype(np.float64)) < 3


@pytest.mark.parametrize("mode", ["L", "1", "LA"])
def test_other_modes_become_rgb_jpegs(coffee, mode):
    result = process_image(encode(coffee.convert(mode), "PNG"), ImageConfig())
    assert (result.status, result.ext, result.width, result.height) == (records.OK, "jpg", 600, 400)
    with Image.open(io.BytesIO(result.data)) as stored:
        assert stored.mode == "RGB"


def test_gif_is_reencoded_as_jpeg(coffee):
    data = encode(coffee.quantize(64), "GIF")
    result = process_image(data, ImageConfig())
    assert (result.status, result.ext, result.width, result.height) == (records.OK, "jpg", 600, 400)
    assert mean_diff(pixels(result.data), np.asarray(coffee, dtype=np.float64)) < 12


# ----------------------------------------------------------------------------- bad bytes


def test_truncated_files_are_decode_errors(coffee):
    for data in (PORTRAIT.read_bytes(), encode(coffee, "PNG")):
        cut = data[: len(data) // 2]
        result = process_image(cut, ImageConfig())
        assert result.status == records.DECODE_ERROR, result.error
        assert result.data is None and result.ext is None and result.width is None
        assert result.sha256 == hashlib.sha256(cut).hexdigest()
        assert "\n" not in result.error


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_jpeg_kept_as_is_is_still_a_decode_error(fraction):
    # A plain RGB JPEG stored unchanged is only checked at 1/8 scale; that check must still
    # read every entropy-coded byte, as the full decode that re-encoding needs does.
    data = SELFIE.read_bytes()
    assert process_image(data, ImageConfig()).data == data  # the reduced-scale path
    cut = data[: int(len(data) * fraction)]
    for cfg in (ImageConfig(), ImageConfig(reencode="always")):
        result = process_image(cut, cfg)
        assert result.status == records.DECODE_ERROR, (cfg.reencode, result.error)
        assert result.data is None and result.width is None


def test_random_bytes():
    data = random.Random(7).randbytes(5000)
    result = process_image(data, ImageConfig())
    assert result.status in (records.NOT_IMAGE, records.DECODE_ERROR)
    assert result.data is None
    with pytest.raises(ImageError):
        decode_rgb(data, 10**8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` but holds no pixel data: decoding it would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header():
    # Over Pillow's own process-wide ceiling.
    assert process_image(png_header_only(100_000, 100_000), ImageConfig()).status == records.DECOMPRESSION_BOMB
    # Under Pillow's ceiling, over ours: still refused without decoding (decoding would be a decode_error).
    header = png_header_only(10_000, 5_000)
    assert process_image(header, ImageConfig(max_pixels=10_000_000)).status == records.DECOMPRESSION_BOMB
    assert process_image(header, ImageConfig(max_pixels=50_000_000)).status == records.DECODE_ERROR
    result = process_image(PORTRAIT.read_bytes(), ImageConfig(max_pixels=2048 * 2048 - 1))
    assert result.status == records.DECOMPRESSION_BOMB and result.data is None
    with pytest.raises(ImageError) as err:
        decode_rgb(PORTRAIT.read_bytes(), 1_000_000)
    assert err.value.status == records.DECOMPRESSION_BOMB


# ----------------------------------------------------------------------------- filters


def test_too_small(coffee):
    result = process_image(encode(coffee.resize((180, 120)), "JPEG"), ImageConfig())
    assert result.status == records.TOO_SMALL and result.data is None
    assert (result.orig_width, result.orig_height) == (180, 120)
    assert process_image(encode(coffee, "PNG"), ImageConfig(min_side=401)).status == records.TOO_SMALL
    assert process_image(encode(coffee, "PNG"), ImageConfig(min_side=400)).status == records.OK


def test_bad_aspect(selfie_small):
    strip = selfie_small.crop((0, 0, 424, 141))  # aspect 3.007
    assert process_image(encode(strip, "JPEG"), ImageConfig(min_side=100)).status == records.BAD_ASPECT
    ok = selfie_small.crop((0, 0, 423, 141))  # aspect exactly 3
    assert process_image(encode(ok, "JPEG"), ImageConfig(min_side=100)).status == records.OK


# ----------------------------------------------------------------------------- storage


def test_resize_max_side_downscales_and_reencodes():
    data = SELFIE.read_bytes()
    result = process_image(data, ImageConfig(resize_max_side=512))
    assert (result.status, result.ext) == (records.OK, "jpg")
    assert (result.width, result.height) == (343, 512)
    assert (result.orig_width, result.orig_height) == (1696, 2528)
    stored = Image.open(io.BytesIO(result.data))
    assert stored.size == (343, 512)
    with Image.open(SELFIE) as full:
        assert mean_diff(small(stored), small(full)) < 4

    # Already small enough: stored unchanged.
    astronaut = (SKIMAGE / "astronaut.png").read_bytes()
    assert process_image(astronaut, ImageConfig(resize_max_side=512)).data == astronaut
    shrunk = process_image(astronaut, ImageConfig(resize_max_side=256))
    assert (shrunk.ext, shrunk.width, shrunk.height) == ("jpg", 256, 256)


def test_reencode_always(coffee):
    data = encode(coffee, "PNG")
    result = process_image(data, ImageConfig(reencode="always", jpeg_quality=90))
    assert (result.status, result.ext, result.width, result.height) == (records.OK, "jpg", 600, 400)
    assert result.data[:3] == b"\xff\xd8\xff"
    assert mean_diff(pixels(result.data), np.asarray(coffee, dtype=np.float64)) < 4
    lower = process_image(data, ImageConfig(reencode="always", jpeg_quality=30))
    assert len(lower.data) < len(result.data)


def test_thread_safety_with_different_limits():
    """40 images at once, each under its own pixel limit just above or just below its size."""
    photos = openpeople_photos()[:10]
    jobs = []
    for i in range(40):
        path = photos[i % 10]
        with Image.open(path) as img:
            w, h = img.size
        # Alternate limits so neighbouring calls disagree about what is too big.
        limit = w * h if i % 2 else w * h - 1
        jobs.append((path.read_bytes(), ImageConfig(max_pixels=limit), (w, h), bool(i % 2)))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: process_image(job[0], job[1]), jobs))

    for (data, _, size, fits), result in zip(jobs, results):
        assert result.sha256 == hashlib.sha256(data).hexdigest()
        if fits:
            assert result.status == records.OK and result.data == data
            assert (result.width, result.height) == size
        else:
            assert result.status == records.DECOMPRESSION_BOMB and result.data is None


# ----------------------------------------------------------------------------- contact sheet


@pytest.fixture(scope="module")
def sheet_items(selfie_small, coffee) -> list[tuple[bytes, str]]:
    caption = "a person smiling at the camera in a bright living room with plants " * 3
    return [
        (encode(selfie_small, "JPEG"), caption),
        (encode(coffee, "PNG"), "a cup of coffee"),
        ((SKIMAGE / "astronaut.png").read_bytes(), "astronaut https://example.com/" + "x" * 200),
        (encode(coffee.convert("RGBA"), "PNG"), ""),
        (encode(selfie_small.rotate(90, expand=True), "WEBP"), "sideways"),
    ]


def test_contact_sheet_grid(tmp_path, sheet_items):
    def sheet_size(n: int) -> tuple[int, int]:
        out = make_contact_sheet(sheet_items[:n], tmp_path / f"sheet{n}.png", title="run", thumb=96, columns=2)
        assert out == tmp_path / f"sheet{n}.png"
        with Image.open(out) as img:
            assert img.format == "PNG"
            return img.size

    one, two, three, four, five = (sheet_size(n) for n in range(1, 6))
    assert one[0] == 8 + 96 + 8
    assert two[0] == three[0] == five[0] == 8 + 2 * (96 + 8)
    assert two[1] == one[1] and three[1] == four[1]  # rows: 1, 1, 2, 2, 3
    row = four[1] - two[1]
    assert row > 96 and five[1] - four[1] == row
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"sheet{n}.png" for n in range(1, 6)]  # no temp files left

    # The first cell shows the (letterboxed) selfie, not background.
    with Image.open(tmp_path / "sheet1.png") as img:
        title_h = img.height - row - 8
        centre = np.asarray(img.convert("RGB"))[title_h + 8 + 48, 8 + 48]
    with Image.open(io.BytesIO(sheet_items[0][0])) as selfie:
        expected = np.asarray(selfie.convert("RGB").resize((64, 96)))[48, 32]
    assert np.abs(centre.astype(int) - expected.astype(int)).max() < 40


def test_contact_sheet_skips_undecodable_and_limits_items(tmp_path, sheet_items):
    junk = (b"not an image at all", "junk")
    truncated = (sheet_items[0][0][:500], "truncated")
    items = [junk, sheet_items[0], truncated, sheet_items[1], junk]
    out = make_contact_sheet(items, tmp_path / "sheet.png", thumb=64, columns=6)
    with Image.open(out) as img:
        assert img.width == 8 + 2 * (64 + 8)  # two cells drawn

    out = make_contact_sheet(iter(sheet_items), tmp_path / "limited.png", thumb=64, columns=6, max_items=3)
    with Image.open(out) as img:
        assert img.width == 8 + 3 * (64 + 8)


def test_contact_sheet_none_when_nothing_to_draw(tmp_path):
    assert make_contact_sheet([], tmp_path / "empty.png") is None
    assert make_contact_sheet([(b"junk", "junk")], tmp_path / "junk.png") is None
    assert list(tmp_path.iterdir()) == []


def test_caption_wrap():
    font = ImageFont.load_default(size=12)
    assert _wrap("a cup of coffee", font, 192) == ["a cup of coffee"]
    assert _wrap("", font, 192) == []
    long = "a person smiling at the camera in a bright living room with plants " * 5
    lines = _wrap(long, font, 192)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 192 for line in lines)
    url = _wrap("https://example.com/" + "x" * 300, font, 192)
    assert len(url) == 3 and url[0].startswith("https://example.com/") and url[-1].endswith("…")
    assert all(font.getlength(line) <= 192 for line in url)
