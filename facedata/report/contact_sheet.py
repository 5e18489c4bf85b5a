"""Contact sheet: one picture of a run's images with their captions, for a quick visual check.

Items may also carry face boxes (drawn on the image) and chips: short labels such as a face's
attributes, drawn as tags under the caption. With `zoom_to_primary` each cell shows the primary
face with some context instead of the whole image. An item without image bytes (None) is an
empty slot: its place in the grid stays plain background, so a row can end early."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from facedata.download.imaging import ImageError, decode_rgb
from facedata.core.shards import atomic_path

# Pillow's default limit: items have normally passed the image stage already.
_MAX_PIXELS = 89_478_485
_PAD = 8
_CAPTION_LINES = 3
_CHIP_ROWS = 2
_CHIP = (222, 235, 255)
_CHIP_TEXT = (20, 50, 110)
_ELLIPSIS = "…"
_BACKGROUND = (255, 255, 255)
_LETTERBOX = (232, 232, 232)
_TEXT = (40, 40, 40)
_TITLE_BAR = (45, 45, 45)
_TITLE_TEXT = (255, 255, 255)
_BOX = (255, 200, 0)
_PRIMARY_BOX = (0, 220, 90)

# A face box on an item: x1, y1, x2, y2 as fractions of the image's width and height, and
# whether it is the image's primary face (drawn in its own colour).
Box = tuple[float, float, float, float, bool]
# How much of the primary face's surroundings a zoomed cell shows: the box grown by this factor.
_ZOOM_CONTEXT = 2.2


def _zoom_box(boxes: Iterable[Box]) -> tuple[float, float, float, float] | None:
    """The primary face's box grown to a square with context, in fractions of the image."""
    primary = next((b for b in boxes if b[4]), None)
    if primary is None:
        return None
    x1, y1, x2, y2, _ = primary
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * _ZOOM_CONTEXT / 2
    return cx - half, cy - half, cx + half, cy + half


def _thumbnail(data: bytes, thumb: int, boxes: list[Box], zoom: bool = False) -> Image.Image | None:
    """The image fitted inside thumb x thumb, its boxes drawn on it, centred on a grey square;
    None if undecodable. With `zoom`, the primary face and its surroundings fill the cell."""
    region = _zoom_box(boxes) if zoom else None
    try:
        img = decode_rgb(data, _MAX_PIXELS, draft_size=None if region else (thumb, thumb))
    except ImageError:
        return None
    if region:
        x1, y1, x2, y2 = region
        img = img.crop((round(x1 * img.width), round(y1 * img.height), round(x2 * img.width), round(y2 * img.height)))
        boxes = [((bx1 - x1) / (x2 - x1), (by1 - y1) / (y2 - y1), (bx2 - x1) / (x2 - x1), (by2 - y1) / (y2 - y1), p)
                 for bx1, by1, bx2, by2, p in boxes]
    img.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)
    # Primary last, so it stays on top where boxes overlap.
    for x1, y1, x2, y2, primary in sorted(boxes, key=lambda box: box[4]):
        draw.rectangle(
            (x1 * img.width, y1 * img.height, x2 * img.width, y2 * img.height),
            outline=_PRIMARY_BOX if primary else _BOX, width=2,
        )
    cell = Image.new("RGB", (thumb, thumb), _LETTERBOX)
    cell.paste(img, ((thumb - img.width) // 2, (thumb - img.height) // 2))
    return cell


def _ellipsize(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """`text` shortened until it fits in `width` pixels with an ellipsis after it."""
    while text and font.getlength(text + _ELLIPSIS) > width:
        text = text[:-1]
    return text.rstrip() + _ELLIPSIS


def _fitting_prefix(text: str, font: ImageFont.FreeTypeFont, width: int) -> int:
    """Length of the longest prefix of `text` that fits in `width` pixels (at least 1)."""
    n = 1
    while n < len(text) and font.getlength(text[: n + 1]) <= width:
        n += 1
    return n


def _wrap(caption: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap into at most _CAPTION_LINES lines, the last ellipsized if text remains.

    A word wider than a line (a URL, a run of CJK text) is cut wherever it overflows.
    """
    lines: list[str] = []
    line = ""
    for word in caption.split():
        if len(lines) > _CAPTION_LINES:
            break  # enough to know the caption overflows
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while font.getlength(word) > width and len(lines) <= _CAPTION_LINES:
            n = _fitting_prefix(word, font, width)
            lines.append(word[:n])
            word = word[n:]
        line = word
    if line:
        lines.append(line)
    if len(lines) > _CAPTION_LINES:
        lines = lines[: _CAPTION_LINES - 1] + [_ellipsize(lines[_CAPTION_LINES - 1], font, width)]
    return lines


def _draw_chips(draw: ImageDraw.ImageDraw, chips: list[str], x: int, y: int, width: int,
                font: ImageFont.FreeTypeFont, row_height: int) -> None:
    """Chips left to right, wrapping onto up to _CHIP_ROWS rows; the ones that do not fit are left out."""
    cx, row = x, 0
    for chip in chips:
        w = math.ceil(font.getlength(chip)) + 6
        if cx + w > x + width and cx > x:
            row, cx = row + 1, x
        if row >= _CHIP_ROWS or w > width:
            break
        top = y + row * row_height
        draw.rounded_rectangle((cx, top, cx + w, top + row_height - 3), radius=4, fill=_CHIP)
        draw.text((cx + 3, top + 1), chip, font=font, fill=_CHIP_TEXT)
        cx += w + 3


def make_contact_sheet(
    items: Iterable[tuple[bytes | None, str] | tuple[bytes | None, str, list[Box]]
                    | tuple[bytes | None, str, list[Box], list[str]]],
    out_path: Path,
    *,
    title: str = "",
    thumb: int = 192,
    columns: int = 6,
    max_items: int = 48,
    zoom_to_primary: bool = False,
) -> Path | None:
    """Draw up to `max_items` decodable (image bytes, caption[, face boxes[, chips]]) items in a
    grid and write it.

    Each cell is `thumb` pixels wide with 8-pixel gutters; captions wrap onto up to 3 lines under
    it, chips onto up to 2 rows under those. Undecodable items are skipped. An item whose bytes
    are None is an empty slot: it takes its place in the grid (and counts towards `max_items`) but
    nothing is drawn there, not even a caption. Returns `out_path`, or None (writing nothing) when
    no item could be drawn. The file is written to a temporary name
    and renamed, so readers never see half a sheet; its format follows the suffix (PNG for an
    unknown one).
    """
    cells: list[tuple[Image.Image, str, list[str]] | None] = []  # None: an empty slot
    for data, caption, *extra in items:
        if len(cells) >= max_items:
            break
        if data is None:
            cells.append(None)
            continue
        cell = _thumbnail(data, thumb, list(extra[0]) if extra else [], zoom_to_primary)
        if cell is not None:
            cells.append((cell, caption, list(extra[1]) if len(extra) > 1 else []))
    while cells and cells[-1] is None:
        cells.pop()
    if not cells:
        return None

    font = ImageFont.load_default(size=max(10, thumb // 16))
    chip_font = ImageFont.load_default(size=max(9, thumb // 19))
    title_font = ImageFont.load_default(size=max(14, thumb // 10))
    line_height = math.ceil(font.size * 1.25)
    chip_height = math.ceil(chip_font.size * 1.25) + 4
    chip_block = _CHIP_ROWS * chip_height if any(cell and cell[2] for cell in cells) else 0
    title_height = math.ceil(title_font.size * 1.25) + 2 * _PAD
    cols = min(columns, len(cells))
    rows = math.ceil(len(cells) / cols)
    cell_w = thumb + _PAD
    cell_h = thumb + _PAD + _CAPTION_LINES * line_height + chip_block + _PAD
    sheet = Image.new("RGB", (_PAD + cols * cell_w, title_height + _PAD + rows * cell_h), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    draw.rectangle((0, 0, sheet.width, title_height - 1), fill=_TITLE_BAR)
    heading = title or f"{sum(cell is not None for cell in cells)} images"
    if title_font.getlength(heading) > sheet.width - 2 * _PAD:
        heading = _ellipsize(heading, title_font, sheet.width - 2 * _PAD)
    draw.text((_PAD, _PAD), heading, font=title_font, fill=_TITLE_TEXT)

    for i, drawn in enumerate(cells):
        if drawn is None:
            continue
        cell, caption, chips = drawn
        x = _PAD + (i % cols) * cell_w
        y = title_height + _PAD + (i // cols) * cell_h
        sheet.paste(cell, (x, y))
        for n, line in enumerate(_wrap(caption, font, thumb)):
            draw.text((x, y + thumb + _PAD // 2 + n * line_height), line, font=font, fill=_TEXT)
        if chips:
            chips_y = y + thumb + _PAD // 2 + _CAPTION_LINES * line_height + 2
            _draw_chips(draw, chips, x, chips_y, thumb, chip_font, chip_height)

    out_path = Path(out_path)
    image_format = Image.registered_extensions().get(out_path.suffix.lower(), "PNG")
    with atomic_path(out_path) as tmp_path:
        sheet.save(tmp_path, format=image_format)
    return out_path
