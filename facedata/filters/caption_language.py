"""Caption language, judged on the input row before download (py3langid's naive Bayes model, which
ships inside its wheel; BSD-3)."""

from __future__ import annotations

import functools

from pydantic import BaseModel, ConfigDict, Field, field_validator

from facedata.filters._images import package_version
from facedata.core.step import Filter


@functools.lru_cache(maxsize=1)
def identifier():
    """py3langid's identifier with probabilities normalised over its 97 languages (loaded once per
    process, ~0.3 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the text's language."""
    return identifier().classify(text)


class CaptionLanguage(Filter):
    """Keeps rows whose caption is in one of `keep_languages` with at least `min_probability`.
    A row with no caption has no language to keep and is dropped too."""

    name = "caption_language"
    version = 1
    reasons = {"caption_language": "caption missing, or not in keep_languages with at least min_probability"}

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        keep_languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1)
        # Probabilities are normalised over all 97 languages and tempered by the caption's length, so
        # short captions score low even when right: "Barack Obama speaks at the White House" is en
        # at 0.39, "Portrait of a young woman smiling in a park" en at 0.88, its German version de at
        # 0.997. 0.25 keeps the first and still needs the language to be the most likely one.
        min_probability: float = Field(0.25, ge=0.0, le=1.0)

        @field_validator("keep_languages")
        @classmethod
        def _known(cls, langs: list[str]) -> list[str]:
            unknown = sorted(set(langs) - set(identifier().labels))
            if unknown:
                raise ValueError(f"unknown language codes {unknown} (py3langid knows ISO 639-1 codes such as en, de, zh)")
            return langs

    def models(self) -> dict[str, dict]:
        return {"language": {"name": "py3langid naive Bayes language identifier (model.npz.xz, 97 languages)",
                             "version": package_version("py3langid"), "licence": "BSD-3-Clause",
                             "source": "py3langid package"}}

    def keep(self, sample: dict) -> bool | str:
        caption = sample.get("caption")
        if not caption or not caption.strip():
            return "caption_language"
        lang, probability = detect_language(caption)
        if lang in self.options.keep_languages and probability >= self.options.min_probability:
            return True
        return "caption_language"
