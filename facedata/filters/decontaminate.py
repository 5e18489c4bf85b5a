"""Benchmark decontamination: drop corpus images that are near copies of evaluation images (CelebA,
LFW, FS2K, ... whatever folders the user has), so a model trained on the dataset is not evaluated on
its own training images. Same matching as the run-wide duplicates (pHash with crop hashes, then the
pixel-level check of duplicates.verify_pair), against every image under the given folders."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from facedata.core import records
from facedata.filters._images import package_version
from facedata.filters.duplicates import binary_index, verify_pair
from facedata.filters.perceptual_hash import hex_to_bytes, image_hashes
from facedata.core.step import ShardStep, StepOutput

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class BenchmarkIndex:
    """The perceptual hashes of every image under some folders, searchable for near copies."""

    def __init__(self, folders: list[Path], radius: int = 8, verify: bool = True):
        self.radius, self.verify = radius, verify
        self.paths: list[Path] = sorted(p for folder in folders for p in Path(folder).rglob("*")
                                        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        whole, owners, codes = [], [], []
        self.unreadable: list[Path] = []
        for n, path in enumerate(self.paths):
            try:
                h, crop_hashes = image_hashes(path.read_bytes())
            except Exception:  # noqa: BLE001 - a benchmark file we cannot decode cannot match anything
                self.unreadable.append(path)
                continue
            whole.append(h)
            # Crops of the benchmark image are indexed too: a corpus image that is a crop of it
            # lands near one of them; the corpus image's own crops cover the other direction.
            codes += [h, *crop_hashes]
            owners += [n] * (1 + len(crop_hashes))
        self.owners = owners
        self.digest = hashlib.sha256("\n".join(sorted(whole)).encode()).hexdigest()
        self.index = binary_index(hex_to_bytes(codes), radius) if codes else None

    def __len__(self) -> int:
        return len(self.paths) - len(self.unreadable)

    def match(self, data: bytes, hashes: tuple[str, list[str]] | None = None) -> Path | None:
        """The benchmark image this image is a near copy of, or None. `hashes`: the image's
        (phash, phash_crops) when the hash step already computed them; the bytes are then decoded
        only to confirm a candidate."""
        if self.index is None:
            return None
        whole, crop_hashes = hashes if hashes is not None else image_hashes(data)
        lims, distances, found = self.index.range_search(hex_to_bytes([whole, *crop_hashes]), self.radius + 1)
        candidates = sorted({(float(d), self.owners[int(i)]) for d, i in zip(distances, found)})
        seen = set()
        for _, owner in candidates:  # nearest first
            if owner in seen:
                continue
            seen.add(owner)
            if not self.verify or verify_pair(self.paths[owner].read_bytes(), data):
                return self.paths[owner]
        return None


class BenchmarkOverlap(ShardStep):
    """Drops images that are near copies of an image under `folders`; `benchmark_match` names it.
    Placed after the `phash` step it reuses that step's columns instead of hashing again."""

    name = "decontaminate"
    version = 1
    needs_images = True
    reasons = {"benchmark_overlap": "a near copy of an image in the decontamination folders"}
    columns = {"benchmark_match": pa.string()}

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        folders: list[Path] = Field(min_length=1)
        radius: int = Field(8, ge=0, le=16)
        # Off: every hash match counts, including photos that only share a backdrop or pose.
        verify: bool = True

        @field_validator("folders")
        @classmethod
        def _exist(cls, folders: list[Path]) -> list[Path]:
            missing = [str(f) for f in folders if not Path(f).expanduser().is_dir()]
            if missing:
                raise ValueError(f"not a folder: {', '.join(missing)}")
            return [Path(f).expanduser().resolve() for f in folders]

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self._index: BenchmarkIndex | None = None

    @property
    def index(self) -> BenchmarkIndex:
        if self._index is None:
            self._index = BenchmarkIndex(self.options.folders, self.options.radius, self.options.verify)
        return self._index

    def settings(self) -> dict:
        # What the folders hold, not only their names, decides which images are dropped.
        settings = super().settings()
        settings["benchmark_hashes_sha256"] = self.index.digest
        settings["benchmark_images"] = len(self.index)
        return settings

    def models(self) -> dict[str, dict]:
        return {"perceptual_hash": {"name": "pHash 64-bit (imagehash) with crop hashes, pixel-level check",
                                    "version": package_version("imagehash"), "licence": "BSD-2-Clause",
                                    "source": "imagehash package (an algorithm, no weights)"}}

    def process(self, rows: list[dict], images: Callable[[], Iterator[tuple[str, bytes]]] | None) -> StepOutput:
        position = {row["key"]: i for i, row in enumerate(rows) if row["status"] == records.OK}
        out = StepOutput(columns={"benchmark_match": [None] * len(rows)}, reasons=[None] * len(rows))
        roots = self.options.folders
        for key, data in images() if images is not None else ():
            i = position.get(key)
            if i is None:
                continue
            row = rows[i]
            known = (row["phash"], list(row.get("phash_crops") or [])) if row.get("phash") else None
            try:
                found = self.index.match(data, known)
            except Exception:  # noqa: BLE001 - an image that cannot be decoded matches nothing
                found = None
            if found is not None:
                root = next((r for r in roots if found.is_relative_to(r)), found.parent)
                out.columns["benchmark_match"][i] = f"{root.name}/{found.relative_to(root)}"
                out.reasons[i] = "benchmark_overlap"
        return out
