"""A caption filter in the manner of FaceID-6M: keep rows whose caption uses human-related words
(person nouns, kinship, pronouns, professions, nationalities), judged before download. The word
list is a documented text file shipped with the package (people_words.txt); the user can pass
their own through `word_list`."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from facedata.core.step import Filter

DEFAULT_WORD_LIST = Path(__file__).with_name("people_words.txt")
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")


@functools.lru_cache(maxsize=8)
def read_word_list(path: str) -> frozenset[str]:
    """The lowercase words of a word-list file: one per line, `#` comments and blank lines skipped."""
    words = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word:
            words.add(word)
    return frozenset(words)


def matches(caption: str, words: frozenset[str]) -> list[str]:
    """The caption's words found in `words` (a plural in -s/-es or a possessive 's matches its
    singular), in caption order."""
    found = []
    for token in _WORD.findall(caption.lower()):
        token = re.sub(r"['’]s$", "", token)
        if token in words or (token.endswith("s") and token[:-1] in words) or (
                token.endswith("es") and token[:-2] in words):
            found.append(token)
    return found


class CaptionAboutPeople(Filter):
    """Keeps rows whose caption holds at least `min_matches` words of the word list."""

    name = "caption_about_people"
    version = 1
    reasons = {"caption_not_about_people": "caption missing, or with fewer than min_matches human-related words"}

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        # None: the list shipped with facedata (facedata/filters/people_words.txt).
        word_list: Path | None = None
        min_matches: int = Field(1, ge=1)

        @field_validator("word_list")
        @classmethod
        def _readable(cls, path: Path | None) -> Path | None:
            if path is None:
                return None
            path = path.expanduser()
            if not path.is_file():
                raise ValueError(f"{path}: no such file")
            if not read_word_list(str(path.resolve())):
                raise ValueError(f"{path}: no words in it")
            return path

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self.words = read_word_list(str((self.options.word_list or DEFAULT_WORD_LIST).resolve()))

    def settings(self) -> dict:
        # The list's content, not only its path, decides the output: hash it into the fingerprint.
        import hashlib

        settings = super().settings()
        settings["word_list_sha256"] = hashlib.sha256("\n".join(sorted(self.words)).encode()).hexdigest()
        return settings

    def keep(self, sample: dict) -> bool | str:
        caption = sample.get("caption")
        if caption and len(matches(caption, self.words)) >= self.options.min_matches:
            return True
        return "caption_not_about_people"
