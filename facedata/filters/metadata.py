"""Thresholds on the metadata columns LAION-style inputs carry, judged before download: CLIP
image-text `similarity`, the `NSFW` tag (LAION-400M) or `punsafe` probability (LAION-5B), the
`pwatermark` probability and the declared `WIDTH`/`HEIGHT`.

The reader carries extra columns as strings (numbers in their JSON spelling), so values are parsed
here. Column names are matched case-insensitively (LAION-400M writes `NSFW`, `WIDTH`; LAION-5B
parquet `width`). A row without a value for a threshold that is set passes that threshold: the
image filters after download judge it from the image itself. Run it on input rows (before download):
after the download step the records also hold the stored image's `width`/`height`, which the
case-insensitive lookup would find when the input has no declared size."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from facedata.core.step import Filter

# LAION-400M's NSFW tag, from its CLIP-based safety estimate, least to most unsafe.
NSFW_TAGS = ("UNLIKELY", "UNSURE", "NSFW")


def _number(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return None
    return float(parsed) if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else None


class MetadataThresholds(Filter):
    """One reason per threshold; each threshold is off (None) by default."""

    name = "metadata"
    version = 1
    reasons = {
        "low_similarity": "input similarity (CLIP image-text cosine) under min_similarity",
        "unsafe_tag": "input NSFW tag above max_nsfw_tag (UNLIKELY < UNSURE < NSFW), or punsafe over max_punsafe",
        "watermark_probability": "input pwatermark over max_pwatermark",
        "declared_too_small": "input WIDTH or HEIGHT under min_width / min_height",
    }

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        # LAION-400M kept pairs at 0.3 cosine (ViT-B/32); LAION-5B used 0.28 for English.
        min_similarity: float | None = Field(None, ge=-1.0, le=1.0)
        max_punsafe: float | None = Field(None, ge=0.0, le=1.0)
        max_nsfw_tag: Literal["UNLIKELY", "UNSURE", "NSFW"] | None = None
        max_pwatermark: float | None = Field(None, ge=0.0, le=1.0)
        min_width: int | None = Field(None, ge=1)
        min_height: int | None = Field(None, ge=1)
        # Column names in the input, if they differ from LAION's.
        similarity_col: str = "similarity"
        punsafe_col: str = "punsafe"
        nsfw_col: str = "NSFW"
        pwatermark_col: str = "pwatermark"
        width_col: str = "WIDTH"
        height_col: str = "HEIGHT"

        @model_validator(mode="after")
        def _something_set(self):
            if all(v is None for v in (self.min_similarity, self.max_punsafe, self.max_nsfw_tag,
                                       self.max_pwatermark, self.min_width, self.min_height)):
                raise ValueError("no threshold set (min_similarity, max_punsafe, max_nsfw_tag, max_pwatermark, "
                                 "min_width, min_height)")
            return self

    @staticmethod
    def _get(sample: dict, column: str):
        if column in sample:
            return sample[column]
        folded = column.lower()
        for name, value in sample.items():
            if name.lower() == folded:
                return value
        return None

    def keep(self, sample: dict) -> bool | str:
        o = self.options
        if o.min_similarity is not None:
            similarity = _number(self._get(sample, o.similarity_col))
            if similarity is not None and similarity < o.min_similarity:
                return "low_similarity"
        if o.max_nsfw_tag is not None:
            tag = self._get(sample, o.nsfw_col)
            tag = tag.strip().strip('"').upper() if isinstance(tag, str) else None
            # An unknown tag is unsafe: LAION writes only these three, anything else is a damaged row.
            if tag and (tag not in NSFW_TAGS or NSFW_TAGS.index(tag) > NSFW_TAGS.index(o.max_nsfw_tag)):
                return "unsafe_tag"
        if o.max_punsafe is not None:
            punsafe = _number(self._get(sample, o.punsafe_col))
            if punsafe is not None and punsafe > o.max_punsafe:
                return "unsafe_tag"
        if o.max_pwatermark is not None:
            pwatermark = _number(self._get(sample, o.pwatermark_col))
            if pwatermark is not None and pwatermark > o.max_pwatermark:
                return "watermark_probability"
        for limit, column in ((o.min_width, o.width_col), (o.min_height, o.height_col)):
            if limit is not None:
                size = _number(self._get(sample, column))
                if size is not None and size < limit:
                    return "declared_too_small"
        return True
