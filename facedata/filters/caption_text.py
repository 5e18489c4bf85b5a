"""Caption length and boilerplate, judged on the input row before download: captions that are a file
name, a URL, a camera's frame number or a placeholder word say nothing about the image."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

from facedata.core.step import Filter

# Words that are a whole caption on many web pages and describe nothing ("image", "untitled").
PLACEHOLDERS = frozenset((
    "image", "img", "picture", "pic", "photo", "photograph", "foto", "thumbnail", "thumb", "untitled",
    "unnamed", "no title", "notitle", "default", "placeholder", "null", "none", "n/a", "na", "undefined",
    "caption", "alt", "alt text", "image description", "screenshot", "screen shot", "click here",
    "download", "view larger", "enlarge", "preview", "gallery", "logo", "icon", "banner", "avatar",
    "profile picture", "stock photo", "image may contain", "featured image",
))

# A scheme or www. prefix, or a bare domain / page name with a common ending.
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|www\.)\S+$"
                  r"|^\S+\.(?:com|org|net|io|co|de|uk|ru|jp|cn|fr|info|html?|php|aspx?)(?:/\S*)?$", re.I)
_FILE_NAME = re.compile(r"^\S+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|heif|avif|svg|raw|cr2|nef|dng)$", re.I)
# Camera and phone frame names: IMG_1234, DSC_0001, DSCN0042, DSCF1234, PXL_20230101_123456789,
# P1010023, GOPR0001, WhatsApp Image 2021-01-01 at 10.00.00, Screenshot_20200101-101010.
_FRAME_NAME = re.compile(
    r"^(?:img|dsc|dscn|dscf|dcim|pxl|mvimg|gopr|gp|sam|p|pict|pic|image|photo|screenshot|whatsapp image)"
    r"[\s_-]*\d[\d\s_.:at-]*(?:\.\w{2,4})?$", re.I)
_NO_LETTERS = re.compile(r"^[\W\d_]*$")


def boilerplate_kind(caption: str, extra_placeholders: frozenset[str] = frozenset()) -> str | None:
    """What makes a caption boilerplate ("url", "file_name", "frame_name", "placeholder",
    "no_letters"), or None for a caption that may describe its image."""
    text = caption.strip()
    folded = re.sub(r"\s+", " ", text.lower()).strip(" .:;,!-_|")
    if _URL.match(text):
        return "url"
    if _FILE_NAME.match(text):
        return "file_name"
    if _FRAME_NAME.match(text):
        return "frame_name"
    if folded in PLACEHOLDERS or folded in extra_placeholders:
        return "placeholder"
    if _NO_LETTERS.match(text):
        return "no_letters"
    return None


class CaptionText(Filter):
    """Drops captions that are boilerplate (a file name, URL, camera frame name, placeholder word or
    no letters at all), then those outside [min_words, max_words] words or [min_chars, max_chars]
    characters. Words are whitespace-separated tokens; in scripts written without spaces (Chinese,
    Japanese) a caption is one word, so set min_words 1 for such corpora and rely on min_chars."""

    name = "caption_text"
    version = 1
    reasons = {
        "caption_boilerplate": "caption is a file name, URL, camera frame name, placeholder word or has no letters",
        "caption_too_short": "caption missing, or under min_words words or min_chars characters",
        "caption_too_long": "caption over max_words words or max_chars characters",
    }

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        # DataComp's text filters use 2 words; LAION kept captions of 5+ characters.
        min_words: int = Field(2, ge=0)
        max_words: int | None = Field(200, ge=1)
        min_chars: int = Field(5, ge=0)
        max_chars: int | None = Field(1000, ge=1)
        drop_boilerplate: bool = True
        # More whole-caption placeholders for the corpus at hand (compared lowercased).
        extra_placeholders: list[str] = Field(default_factory=list)

        @model_validator(mode="after")
        def _ranges(self):
            if self.max_words is not None and self.max_words < self.min_words:
                raise ValueError(f"max_words {self.max_words} is under min_words {self.min_words}")
            if self.max_chars is not None and self.max_chars < self.min_chars:
                raise ValueError(f"max_chars {self.max_chars} is under min_chars {self.min_chars}")
            return self

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self._extra = frozenset(p.strip().lower() for p in self.options.extra_placeholders)

    def keep(self, sample: dict) -> bool | str:
        caption = (sample.get("caption") or "").strip()
        o = self.options
        if not caption:
            return "caption_too_short"
        if o.drop_boilerplate and boilerplate_kind(caption, self._extra):
            return "caption_boilerplate"
        words, chars = len(caption.split()), len(caption)
        if words < o.min_words or chars < o.min_chars:
            return "caption_too_short"
        if (o.max_words is not None and words > o.max_words) or (o.max_chars is not None and chars > o.max_chars):
            return "caption_too_long"
        return True
