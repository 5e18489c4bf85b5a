"""Publishing a finished run as a dataset folder: parquet for `datasets`, webdataset tars, a manifest.

`publish_run(RUN, DEST)` streams the run's kept samples (status ok in `RUN/captions/NNNNN.parquet`, images
from `RUN/shards/NNNNN.tar`) into DEST, one sample at a time: at most one open output shard per split and
format, and a buffer of one parquet row group, so memory stays flat in the size of the run.

DEST layout:

- `data/{split}-{i:05d}-of-{n:05d}.parquet`: the Hugging Face naming, so `datasets.load_dataset(str(DEST))`
  (and `load_dataset("parquet", data_dir=DEST/"data")`) finds the splits by file name. The `datasets.Features`
  of `FEATURES` are embedded in each file's schema metadata, so `image` decodes to a PIL image;
- `webdataset/{split}-{i:05d}.tar`: `KEY.jpg|png|webp` (the stored image, or with `crops=True` the primary
  face crop as `KEY.jpg`), `KEY.txt` (the face caption) and `KEY.json` (the parquet row without the image);
- `embeddings/{split}-{i:05d}.npy` (float16, the primary face's embedding, one row per sample) and
  `embeddings/{split}-{i:05d}.parquet` (the keys in row order), only with `embeddings=True`. Shard i of a
  split holds the same samples, in the same order, in every format;
- `README.md` (and whatever else the dataset card writes: facedata.publish.card);
- `manifest.json`, written last: run, code version, config, models, counts, every file with its size and
  sha256, and a fingerprint of the run's records and the publish options.

Everything is written into a hidden sibling folder of DEST first and renamed onto DEST at the end, so a killed
publish never leaves a half dataset at DEST. Publishing the same run with the same options again finds the same
fingerprint in DEST's manifest and does nothing. Two publishes to the same DEST at the same time are not supported.

DEST is written only when it is missing, empty, or holds an earlier publish (its manifest.json, format
facedata-publish); anything else (a folder of photos, a file, a symbolic link) is refused with NotAPublishError,
`overwrite` or not, and nothing there is touched. Replacing an earlier publish (`overwrite`) deletes only what it
wrote: the files its manifest lists, the manifest, and the folders left empty. Anything else in DEST (a `facedata
search` index, a user's file) is hard-linked into the new folder before the swap, so it stays where it was; a
file of that kind at a path the new publish writes is refused instead. The earlier publish is moved aside for the
swap and then removed by that list; a publish killed in between is put back or finished by the next one.

URLs are published without credentials: the `user:password@` part of each sample's URL (and of URLs in the run's
config) is removed (`strip_userinfo`); the manifest counts the samples concerned (`url_credentials_stripped`) and
the dataset card says so.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from facedata.core import records
from facedata.attributes.vocabulary import ATTRIBUTES
from facedata.core.errors import UserError
from facedata.core.fingerprints import check_current
from facedata.core.progress import progress_bar
from facedata.core.run_layout import RunLayout
from facedata.core.shards import file_sha256, shard_name

log = logging.getLogger(__name__)

PUBLISH_FORMAT = 2  # bump when the published layout or columns change: it is part of the fingerprint
SPLITS = ("train", "validation", "test")  # published in this order; other split names follow, sorted
DEFAULT_SPLIT = "train"  # for kept records without a split (a run without the identity stage)
CROP_SCALE = 1.5  # the primary face box is grown this much (on its longer side) into a square crop
CROP_JPEG_QUALITY = 95
ROW_GROUP_ROWS = 100  # parquet row group size: the datasets library's default for image datasets
N_EXAMPLES = 12  # (image, caption) pairs handed to the dataset card
MANIFEST = "manifest.json"
LICENSE_COLUMNS = ("license", "licence")
_SHARD_FILE = re.compile(r"^(\d{5})\.")


# ------------------------------------------------------------------------------------------------ schema

def _attribute_features():
    from datasets import Value

    dtype = {"number": "float32", "bool": "bool", "category": "string"}
    values = {name: Value(dtype[spec.kind]) for name, spec in ATTRIBUTES.items()}
    confidences = {name: Value("float32") for name in ATTRIBUTES}
    return values, confidences


def publish_features():
    """The published columns as `datasets.Features` (the parquet schema is derived from it)."""
    from datasets import Features, Image, List, Value

    values, confidences = _attribute_features()
    face = {
        "bbox": List(Value("float32"), length=4),  # x1, y1, x2, y2 in the image's pixels
        "landmarks": List(Value("float32"), length=10),  # 5 x (x, y): eyes, nose, mouth corners (image left/right)
        "score": Value("float32"),  # detector score
        "yaw": Value("float32"),
        "pitch": Value("float32"),
        "roll": Value("float32"),
        "identity_id": Value("int64"),  # null for a face without an embedding
        "primary": Value("bool"),
        "attributes": values,  # null for a face that was not described; a field is null where not confident
        "confidences": confidences,
    }
    return Features({
        "key": Value("string"),
        "image": Image(),
        "face_caption": Value("string"),
        "caption": Value("string"),  # the original web caption
        "url": Value("string"),
        "width": Value("int32"),
        "height": Value("int32"),
        "n_faces": Value("int32"),
        "identity_id": Value("int64"),  # the primary face's identity
        "split": Value("string"),
        "faces": List(face),
        "source_url": Value("string"),
        "license": Value("string"),  # from the input's license/licence column, null without one
        "sha256": Value("string"),  # of the published image bytes (the `image` column)
        "source_sha256": Value("string"),  # of the bytes downloaded from source_url (before any resize)
    })


# ------------------------------------------------------------------------------------------- run shards

@dataclass
class RunShards:
    run_dir: Path
    ids: list[int]  # complete shards, published
    skipped: list[dict] = field(default_factory=list)  # {"shard", "missing"}


def _shard_ids(run_dir: Path) -> list[int]:
    """Every shard the run planned or started: the plan's list, plus any shard file in shards/."""
    ids: set[int] = set()
    plan = RunLayout(run_dir).plan_dir / "plan.json"
    if plan.exists():
        try:
            ids.update(int(s["shard_id"]) for s in json.loads(plan.read_text())["shards"])
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{plan}: not a readable shard plan ({err})") from None
    for path in RunLayout(run_dir).step_dir("download").iterdir():
        m = _SHARD_FILE.match(path.name)
        if m:
            ids.add(int(m.group(1)))
    return sorted(ids)


def find_shards(run_dir: Path, skip_partial: bool = False) -> RunShards:
    """The run's shards whose download and caption stages both finished; an unfinished one is an
    error naming its missing file, or with `skip_partial` a logged warning and a `skipped` entry."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    layout = RunLayout(run_dir)
    if not layout.step_dir("download").is_dir():
        raise UserError(f"{run_dir}: not a run directory (no {layout.step_dir('download').name}/ folder)")
    if not layout.step_dir("captions").is_dir():
        raise UserError(f"{layout.step_dir('captions')}: missing; publish needs a run whose caption stage ran")
    ids = _shard_ids(run_dir)
    if not ids:
        raise UserError(f"{run_dir / 'shards'}: no shards in this run")
    found = RunShards(run_dir, [])
    for shard_id in ids:
        name = shard_name(shard_id)
        final = layout.step_order()[-1]
        needed = [layout.stats_file("download", shard_id), layout.images_tar(shard_id),
                  layout.stats_file(final, shard_id), _captions_path(run_dir, shard_id)]
        missing = next((p for p in needed if not p.exists()), None)
        if missing is None:
            found.ids.append(shard_id)
        elif skip_partial:
            log.warning("publish: skipping unfinished shard %s (%s is missing)", name, missing)
            found.skipped.append({"shard": name, "missing": str(missing.relative_to(run_dir))})
        else:
            raise UserError(f"{missing}: missing, so shard {name} is unfinished; resume the run or pass --skip-partial")
    # The card states the run's config: refuse outputs that another config made. After the loop, so that an
    # unfinished shard is named by its missing file (and --skip-partial offered) first.
    check_current(RunLayout(run_dir), allow_missing=skip_partial)
    if not found.ids:
        raise UserError(f"{run_dir}: no finished shard to publish")
    return found


def _captions_path(run_dir: Path, shard_id: int) -> Path:
    """The shard's final records: the caption step's, or those of a user's step after it."""
    layout = RunLayout(run_dir)
    return layout.records_file(layout.step_order()[-1], shard_id)


def _split_of(value: str | None) -> str:
    return value or DEFAULT_SPLIT


def count_splits(shards: RunShards) -> Counter:
    """Kept samples per split, reading only the status and split columns."""
    counts: Counter = Counter()
    for shard_id in shards.ids:
        path = _captions_path(shards.run_dir, shard_id)
        names = pq.read_schema(path).names
        for column in ("key", "status", "face_caption"):
            if column not in names:
                raise UserError(f"{path}: no {column!r} column; is this a finished caption shard?")
        table = pq.read_table(path, columns=["status"] + (["split"] if "split" in names else []))
        status = table.column("status").to_pylist()
        split = table.column("split").to_pylist() if "split" in names else [None] * len(status)
        counts.update(_split_of(sp) for st, sp in zip(status, split) if st == records.OK)
    return counts


def split_order(counts: Counter) -> list[str]:
    return [s for s in SPLITS if counts.get(s)] + sorted(s for s in counts if s not in SPLITS and counts[s])


# ------------------------------------------------------------------------------------------ fingerprint

def fingerprint(shards: RunShards, options: dict) -> str:
    """What the published content depends on: every published shard's final records (the captions
    parquet's bytes), its image tar's size, its embeddings' size when they are published, the skipped
    shards, the options and the publish format. Cheap: the images themselves are not read."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": PUBLISH_FORMAT, "options": options, "skipped": shards.skipped},
                        sort_keys=True).encode())
    for shard_id in shards.ids:
        name = shard_name(shard_id)
        h.update(f"\n{name} {file_sha256(_captions_path(shards.run_dir, shard_id))}".encode())
        h.update(f" tar={RunLayout(shards.run_dir).images_tar(shard_id).stat().st_size}".encode())
        if options.get("embeddings"):
            emb = RunLayout(shards.run_dir).shard_file("faces", shard_id, "embeddings.npy")
            h.update(f" emb={emb.stat().st_size if emb.exists() else -1}".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- samples

@dataclass
class Sample:
    record: dict  # the final record (one row of captions/NNNNN.parquet)
    image: bytes
    ext: str
    shard_id: int


def iter_samples(shards: RunShards) -> Iterator[Sample]:
    """Kept samples with their image bytes, shard by shard in key order; one image in memory.

    Key order, not the tar's: the download stage writes images as they arrive, so the tar's order
    differs from run to run, and a published dataset (and a model trained on it) should not."""
    for shard_id in shards.ids:
        path = _captions_path(shards.run_dir, shard_id)
        kept = {r["key"]: r for r in pq.read_table(path).to_pylist() if r["status"] == records.OK}
        if not kept:
            continue
        tar_path = RunLayout(shards.run_dir).images_tar(shard_id)
        try:
            with tarfile.open(tar_path, "r") as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                missing = [key for key, r in kept.items() if f"{key}.{r.get('ext') or 'jpg'}" not in members]
                if missing:
                    raise UserError(f"{tar_path}: no image for kept sample {sorted(missing)[0]} "
                                    f"({len(missing)} missing); the run is damaged")
                for key in sorted(kept):
                    member = members[f"{key}.{kept[key].get('ext') or 'jpg'}"]
                    image = tar.extractfile(member).read()
                    yield Sample(kept[key], image, member.name.rsplit(".", 1)[1], shard_id)
        except tarfile.TarError as err:
            raise UserError(f"{tar_path}: unreadable tar ({err})") from None


def _floats(values, n: int) -> list[float] | None:
    if values is None or len(values) != n:
        return None
    return [float(v) for v in values]


def strip_userinfo(url):
    """`url` without its `user:password@` part (the userinfo of RFC 3986: credentials must not be published), the
    rest unchanged character for character: scheme, host (an IPv6 host keeps its brackets), port, path, query,
    fragment. Anything else (None, a URL without userinfo, a path) comes back as it is."""
    if not isinstance(url, str) or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: cut the authority (up to / ? #) by hand
        m = re.match(r"((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)([^/?#]*)", url)
        if not m or "@" not in m.group(2):
            return url
        return m.group(1) + m.group(2).rpartition("@")[2] + url[m.end():]
    if "@" not in parts.netloc:
        return url  # an "@" in the path, query or fragment is not userinfo
    host = parts.netloc.rpartition("@")[2]  # the last "@" ends the userinfo (a password may hold one, unescaped)
    at = url.find("//" + parts.netloc)
    if at >= 0:
        return url[:at + 2] + host + url[at + 2 + len(parts.netloc):]
    return urlunsplit(parts._replace(netloc=host))  # urlsplit dropped a tab or newline from the authority


def _strip_userinfo_in(value):
    """`value` (a config: dicts, lists, strings) with the userinfo stripped from every URL string in it."""
    if isinstance(value, dict):
        return {k: _strip_userinfo_in(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_userinfo_in(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return strip_userinfo(value)
    return value


def sample_row(record: dict, split: str, image: bytes | None = None) -> dict:
    """The published metadata of one sample (the parquet row without its image). Its URLs are published without
    any `user:password@` part (`strip_userinfo`)."""
    faces = record.get("faces") or []
    face_ids = record.get("face_identity_ids") or []
    described = {a["face"]: a for a in (record.get("face_attributes") or [])}
    out_faces = []
    for i, face in enumerate(faces):
        ident = face_ids[i] if i < len(face_ids) else None
        attrs = described.get(i)
        out_faces.append({
            "bbox": _floats(face.get("bbox"), 4),
            "landmarks": _floats(face.get("kps"), 10),
            "score": face.get("score"),
            "yaw": face.get("yaw"),
            "pitch": face.get("pitch"),
            "roll": face.get("roll"),
            "identity_id": ident if ident is not None and ident >= 0 else None,
            "primary": bool(face.get("primary")),
            "attributes": attrs["values"] if attrs else None,
            "confidences": attrs["confidences"] if attrs else None,
        })
    licence = next((record[c] for c in LICENSE_COLUMNS if record.get(c) is not None), None)
    url = strip_userinfo(record.get("url"))
    return {
        "key": record["key"],
        "face_caption": record.get("face_caption"),
        "caption": record.get("caption"),
        "url": url,
        "width": record.get("width"),
        "height": record.get("height"),
        "n_faces": record.get("n_faces") if record.get("n_faces") is not None else len(faces),
        "identity_id": record.get("identity_id"),
        "split": split,
        "faces": out_faces,
        "source_url": url,
        "license": str(licence) if licence is not None else None,
        "sha256": hashlib.sha256(image).hexdigest() if image is not None else None,
        "source_sha256": record.get("sha256"),
    }


def primary_index(record: dict) -> int | None:
    faces = record.get("faces") or []
    p = record.get("primary_face")
    if p is not None and 0 <= p < len(faces):
        return int(p)
    return next((i for i, f in enumerate(faces) if f.get("primary")), 0 if faces else None)


def crop_box(bbox, width: int, height: int, scale: float = CROP_SCALE) -> tuple[int, int, int, int]:
    """The face box grown `scale` times on its longer side into a square, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    side = max(x2 - x1, y2 - y1) * scale
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    right, bottom = left + round(side), top + round(side)
    box = (max(0, left), max(0, top), min(width, right), min(height, bottom))
    if box[2] <= box[0] or box[3] <= box[1]:
        return (0, 0, width, height)
    return box


def face_crop(image: bytes, bbox, max_pixels: int) -> tuple[bytes, tuple[int, int, int, int]]:
    """JPEG bytes of the primary face crop, and its box in the image's pixels."""
    from facedata.download.imaging import decode_rgb

    img = decode_rgb(image, max_pixels)
    box = crop_box(bbox, img.width, img.height)
    buf = io.BytesIO()
    img.crop(box).save(buf, format="JPEG", quality=CROP_JPEG_QUALITY)
    return buf.getvalue(), box


# --------------------------------------------------------------------------------------------- writers

def _tar_add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class SplitWriter:
    """One split's output: a parquet file, a tar and (optionally) embeddings per output shard of
    `samples_per_shard` samples; only the current shard is open, and a row group is buffered."""

    def __init__(self, root: Path, split: str, n_samples: int, samples_per_shard: int, *, crops: bool,
                 embeddings: bool, schema: pa.Schema, max_pixels: int, mtime: int, files: dict):
        self.root, self.split, self.n_samples = root, split, n_samples
        self.per_shard = samples_per_shard
        self.n_shards = math.ceil(n_samples / samples_per_shard)
        self.crops, self.embeddings = crops, embeddings
        self.schema, self.max_pixels, self.mtime, self.files = schema, max_pixels, mtime, files
        self.shard = -1
        self.in_shard = 0
        self.written = 0
        self._pq: pq.ParquetWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._rows: list[dict] = []
        self._emb: list[np.ndarray] = []
        self._emb_keys: list[str] = []
        self._emb_faces: list[int | None] = []

    def _paths(self, i: int) -> dict[str, Path]:
        return {
            "parquet": self.root / "data" / f"{self.split}-{i:05d}-of-{self.n_shards:05d}.parquet",
            "tar": self.root / "webdataset" / f"{self.split}-{i:05d}.tar",
            "npy": self.root / "embeddings" / f"{self.split}-{i:05d}.npy",
            "keys": self.root / "embeddings" / f"{self.split}-{i:05d}.parquet",
        }

    def _open(self) -> None:
        self.shard += 1
        self.in_shard = 0
        paths = self._paths(self.shard)
        for kind in ("parquet", "tar") + (("npy",) if self.embeddings else ()):
            paths[kind].parent.mkdir(parents=True, exist_ok=True)
        # Image bytes are already compressed (JPEG/PNG): dictionary-encoding and snappy-compressing
        # them cost time and saved under 2%, so that column is written plain, as datasets does.
        self._pq = pq.ParquetWriter(
            paths["parquet"], self.schema,
            use_dictionary=[c for c in self.schema.names if c != "image"],
            compression={c: ("none" if c == "image" else "snappy") for c in self.schema.names},
            write_statistics=[c for c in self.schema.names if c != "image"],
        )
        self._tar = tarfile.open(paths["tar"], "w", format=tarfile.PAX_FORMAT)

    def _flush_rows(self) -> None:
        if self._rows:
            self._pq.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def _record(self, path: Path) -> None:
        rel = path.relative_to(self.root).as_posix()
        self.files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        log.debug("publish: wrote %s (%d bytes)", rel, self.files[rel]["bytes"])

    def _close(self) -> None:
        if self._pq is None:
            return
        paths = self._paths(self.shard)
        self._flush_rows()
        self._pq.close()
        self._tar.close()
        self._pq = self._tar = None
        self._record(paths["parquet"])
        self._record(paths["tar"])
        if self.embeddings:
            dim = max((e.shape[0] for e in self._emb if e is not None), default=0)
            matrix = np.full((len(self._emb), dim), np.nan, np.float16)
            for j, e in enumerate(self._emb):
                if e is not None:
                    matrix[j] = e
            np.save(paths["npy"], matrix)
            pq.write_table(pa.table({"key": pa.array(self._emb_keys, pa.string()),
                                     "face": pa.array(self._emb_faces, pa.int32())}), paths["keys"])
            self._record(paths["npy"])
            self._record(paths["keys"])
            self._emb, self._emb_keys, self._emb_faces = [], [], []

    def add(self, sample: Sample, row: dict, embedding: np.ndarray | None) -> dict:
        """Write one sample everywhere; returns the webdataset JSON metadata it got."""
        if self._pq is None or self.in_shard >= self.per_shard:
            self._close()
            self._open()
        key = row["key"]
        self._rows.append({**row, "image": {"bytes": sample.image, "path": f"{key}.{sample.ext}"}})
        if len(self._rows) >= ROW_GROUP_ROWS:
            self._flush_rows()
        meta = dict(row)
        image, ext = sample.image, sample.ext
        if self.crops:
            p = primary_index(sample.record)
            if p is not None and row["faces"][p]["bbox"] is not None:
                image, box = face_crop(sample.image, row["faces"][p]["bbox"], self.max_pixels)
                ext = "jpg"
                meta["crop_box"] = list(box)
                meta["crop_face"] = p
        _tar_add(self._tar, f"{key}.{ext}", image, self.mtime)
        _tar_add(self._tar, f"{key}.txt", (row["face_caption"] or "").encode("utf-8"), self.mtime)
        _tar_add(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode("utf-8"), self.mtime)
        if self.embeddings:
            self._emb.append(embedding)
            self._emb_keys.append(key)
            self._emb_faces.append(primary_index(sample.record))
        self.in_shard += 1
        self.written += 1
        return meta

    def abort(self) -> None:
        """Close the open files of a publish that failed (its folder is removed)."""
        for handle in (self._pq, self._tar):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001 - the files are thrown away
                pass
        self._pq = self._tar = None

    def close(self) -> None:
        self._close()
        if self.written != self.n_samples:
            raise RuntimeError(f"split {self.split}: counted {self.n_samples} kept samples, wrote {self.written}")


class _Embeddings:
    """The primary face's embedding of a sample, from the run's faces/NNNNN.embeddings.npy (memory-mapped)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._shard: int | None = None
        self._matrix: np.ndarray | None = None

    def get(self, sample: Sample) -> np.ndarray | None:
        if sample.shard_id != self._shard:
            path = RunLayout(self.run_dir).shard_file("faces", sample.shard_id, "embeddings.npy")
            if not path.exists():
                raise UserError(f"{path}: missing; publish without --embeddings or resume the run")
            self._matrix = np.load(path, mmap_mode="r")
            self._shard = sample.shard_id
        p = primary_index(sample.record)
        index = (sample.record.get("faces") or [])[p].get("embedding_index") if p is not None else None
        if index is None or not 0 <= index < len(self._matrix):
            log.warning("publish: sample %s has no primary face embedding; its row is NaN", sample.record["key"])
            return None
        return np.asarray(self._matrix[index], np.float16)


# ------------------------------------------------------------------------------------------ card input

class _CardInput:
    """What the dataset card needs, gathered while streaming: a small row per sample (columnar) and up
    to N_EXAMPLES (image bytes, face caption) pairs, one per identity first."""

    COLUMNS = ("split", "width", "height", "n_faces", "face_side", "face_area_ratio", "age", "gender", "expression",
               "caption_words", "web_caption_words", "identity_id")

    def __init__(self):
        self.columns: dict[str, list] = {c: [] for c in self.COLUMNS}
        self.examples: list[tuple[bytes, str]] = []
        self._spare: list[tuple[bytes, str]] = []
        self._identities: set = set()

    def add(self, sample: Sample, row: dict) -> None:
        p = primary_index(sample.record)
        face = row["faces"][p] if p is not None else None
        bbox = face["bbox"] if face else None
        attrs = (face or {}).get("attributes") or {}
        caption = row["face_caption"]
        values = {
            "split": row["split"], "width": row["width"], "height": row["height"], "n_faces": row["n_faces"],
            "face_side": min(bbox[2] - bbox[0], bbox[3] - bbox[1]) if bbox else None,
            "face_area_ratio": (sample.record["faces"][p].get("area_ratio") if p is not None else None),
            "age": attrs.get("age"), "gender": attrs.get("gender"), "expression": attrs.get("expression"),
            "caption_words": len(caption.split()) if caption else None,
            "web_caption_words": len(row["caption"].split()) if row["caption"] else None,
            "identity_id": row["identity_id"],
        }
        for c in self.COLUMNS:
            self.columns[c].append(values[c])
        if not caption or len(self.examples) >= N_EXAMPLES:
            return
        identity = row["identity_id"]
        if identity is None or identity not in self._identities:
            self._identities.add(identity)
            self.examples.append((sample.image, caption))
        elif len(self._spare) < N_EXAMPLES:
            self._spare.append((sample.image, caption))

    def samples(self):
        import pandas as pd

        return pd.DataFrame(self.columns, columns=list(self.COLUMNS))

    def all_examples(self) -> list[tuple[bytes, str]]:
        return (self.examples + self._spare)[:N_EXAMPLES]


# --------------------------------------------------------------------------------------------- manifest

def code_version() -> dict:
    """facedata's version and, when the code is a git checkout, its commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("facedata")
    except PackageNotFoundError:
        package_version = None
    commit = None
    repo = Path(__file__).resolve().parents[2]  # the checkout, when run from one
    if (repo / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10)
            commit = out.stdout.strip() or None if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"facedata": package_version, "git_commit": commit}


def _yaml_features() -> list | None:
    """The features in the dataset card's YAML form (`dataset_info.features`)."""
    try:
        return publish_features()._to_yaml_list()
    except AttributeError:  # a datasets version without the (private) helper: the card goes without
        return None


def read_manifest(dest: Path) -> dict | None:
    path = Path(dest) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _intact(dest: Path, manifest: dict) -> bool:
    """Every file the manifest lists is in DEST with its size."""
    for rel, info in (manifest.get("files") or {}).items():
        path = dest / rel
        if not path.is_file() or path.stat().st_size != info.get("bytes"):
            return False
    return True


def _read_yaml(path: Path) -> dict | None:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def _read_summary(run_dir: Path) -> dict:
    path = RunLayout(run_dir).summary_file
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


# ------------------------------------------------------------------------------------------------ DEST

def _check_apart(dest: Path, run_dir: Path) -> None:
    dest_abs, run_abs = dest.resolve(), run_dir.resolve()
    if dest_abs == run_abs or dest_abs in run_abs.parents or run_abs in dest_abs.parents:
        raise UserError(f"{dest}: the destination must be outside the run directory {run_dir}")


def holds_publish_of(dest: Path, run_dir: Path) -> bool:
    """Whether the folder DEST holds a publish of the run at run_dir (any version of it)."""
    manifest = read_manifest(dest) if dest.is_dir() else None
    return bool(manifest) and manifest.get("run_dir") == str(Path(run_dir).resolve())


class NotAPublishError(UserError):
    """DEST holds something that is not an earlier facedata publish: publish never replaces it, even with
    --overwrite, and deletes nothing there."""


def earlier_publish(dest: Path) -> dict | None:
    """The manifest of the facedata publish the folder DEST holds (its manifest.json, as publish writes it:
    format facedata-publish, with the files it wrote), or None when DEST is not one."""
    if dest.is_symlink() or not dest.is_dir():
        return None
    manifest = read_manifest(dest)
    if isinstance(manifest, dict) and manifest.get("format") == "facedata-publish" \
            and isinstance(manifest.get("files"), dict):
        return manifest
    return None


def _check_dest(dest: Path, fp: str, overwrite: bool) -> tuple[dict | None, dict | None]:
    """(the manifest of an identical earlier publish at DEST, else None; the manifest of the earlier publish
    that will be replaced, else None). Raises NotAPublishError for anything at DEST but an empty folder or an
    earlier publish, and UserError for an earlier publish of other content without `overwrite`."""
    if not dest.exists() and not dest.is_symlink():
        return None, None
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        return None, None
    manifest = read_manifest(dest) if dest.is_dir() else None
    if manifest and manifest.get("fingerprint") == fp and _intact(dest, manifest):
        return manifest, None
    earlier = earlier_publish(dest)
    if earlier is None:
        what = ("is a symbolic link" if dest.is_symlink() else "is a file" if not dest.is_dir()
                else f"holds files but no {MANIFEST} of a facedata publish")
        raise NotAPublishError(f"{dest} {what}: publish only replaces an earlier publish (even with --overwrite), so"
                               " nothing there was touched; publish to a new or empty folder")
    if not overwrite:
        raise UserError(f"{dest} exists with different content; pass --overwrite")
    return None, earlier


def _owned(manifest: dict) -> set[str]:
    """The paths an earlier publish wrote in its folder: the files its manifest lists, and the manifest."""
    return {rel for rel in manifest.get("files") or {} if _safe_rel(rel)} | {MANIFEST}


def _safe_rel(rel: str) -> bool:
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def _entries(folder: Path) -> Iterator[tuple[str, bool]]:
    """(relative path, is an empty folder) of every file, symbolic link and empty folder under `folder`."""
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            yield (base / name).as_posix(), False
        if not dirs and not files and Path(root) != folder:
            yield base.as_posix(), True


def _keep_foreign(dest: Path, tmp: Path, owned: set[str], symlink: bool = False) -> list[str]:
    """Hard-link every entry of DEST that the earlier publish did not write (a search index, a user's file)
    into the new publish at `tmp`, at the same path, so the swap keeps it; returns their paths. Refuses
    (deleting nothing) when the new publish writes a file at one of those paths or no link can be made.
    `symlink`: symbolic links instead (a dry run's temporary folder, maybe on another disk)."""
    made = {parent.as_posix() for rel in owned for parent in Path(rel).parents}  # the folders it made
    foreign = [(rel, empty_dir) for rel, empty_dir in _entries(dest)
               if rel not in owned and not (empty_dir and rel in made)]
    for rel, empty_dir in foreign:
        clash = next((q.relative_to(tmp).as_posix() for q in [tmp / rel, *(tmp / rel).parents]
                      if q != tmp and q.is_relative_to(tmp) and (q.is_file() or q.is_symlink())), None)
        if clash is None and not empty_dir and (tmp / rel).exists():
            clash = rel + "/"
        if clash is not None:
            raise NotAPublishError(f"{dest / rel}: not written by the earlier publish, and the new one writes"
                                   f" {clash or rel}; nothing was touched: move it out of {dest} and publish again")
    for rel, empty_dir in foreign:
        target = tmp / rel
        try:
            if empty_dir:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                if symlink:
                    os.symlink(os.path.abspath(dest / rel), target)
                else:
                    os.link(dest / rel, target, follow_symlinks=False)
        except OSError as err:
            raise NotAPublishError(f"{dest / rel}: not written by the earlier publish, and it cannot be kept in the"
                                   f" new one ({err.strerror or err}); nothing was touched: move it out of {dest}"
                                   " and publish again") from None
    if foreign:
        log.info("publish: keeping %d files in %s that the earlier publish did not write (e.g. %s)", len(foreign),
                 dest, foreign[0][0])
    return [rel for rel, _ in foreign]


def _remove_publish(folder: Path, owned: set[str], kept_in: Path | None = None) -> None:
    """Delete, from the moved-aside earlier publish `folder`, the files it wrote (`owned`) and the entries that
    live on in `kept_in` (the same file, hard-linked there), then the folders left empty. Nothing else is
    deleted: a folder still holding something is left, with a warning."""
    real = Path(os.path.realpath(folder))
    for rel, empty_dir in list(_entries(folder)):
        path = folder / rel
        if empty_dir or Path(os.path.realpath(path.parent)) != real / Path(rel).parent:
            continue  # folders go below, once empty; never follow a link out of the folder
        if rel in owned:
            path.unlink()
        elif kept_in is not None:
            kept = kept_in / rel
            try:
                if os.path.samestat(path.lstat(), kept.lstat()):
                    path.unlink()
            except FileNotFoundError:
                pass
    for root, dirs, _ in os.walk(folder, topdown=False):
        for d in dirs:
            path = Path(root) / d
            if not path.is_symlink():
                try:
                    path.rmdir()
                except OSError:  # not empty: it holds something publish did not write
                    pass
    try:
        folder.rmdir()
    except OSError:
        log.warning("publish: left %s: it holds files that no publish wrote", folder)


def _clean_stale(dest: Path) -> None:
    """What an earlier publish to DEST that was killed left beside it: its temp folders (its own output, and
    links to files that are still in DEST), and an earlier publish moved aside (its own files only)."""
    for stale in sorted(dest.parent.glob(f".{dest.name}.publish-*")):
        if stale.is_symlink() or not stale.is_dir():
            continue
        log.info("publish: removing %s, left by an interrupted publish", stale)
        if stale.name.startswith(f".{dest.name}.publish-old-"):
            manifest = earlier_publish(stale)
            if manifest is None:
                log.warning("publish: left %s: it holds no publish manifest", stale)
            else:
                _remove_publish(stale, _owned(manifest), kept_in=dest)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _restore_moved_aside(dest: Path) -> None:
    """A publish killed between its two renames left DEST missing and the earlier publish beside it: put it
    back, so the destination is as it was."""
    if dest.exists() or dest.is_symlink():
        return
    moved = [p for p in dest.parent.glob(f".{dest.name}.publish-old-*") if p.is_dir() and not p.is_symlink()]
    if len(moved) == 1:
        log.info("publish: restoring %s from %s, left by an interrupted publish", dest, moved[0])
        os.rename(moved[0], dest)


def _fresh_sibling(dest: Path, tag: str) -> Path:
    """An unused hidden path beside DEST (`.NAME.TAG...`), cleaned by `_clean_stale` if left behind."""
    while True:
        path = dest.parent / f".{dest.name}.{tag}{secrets.token_hex(4)}"
        if not path.exists():
            return path


def _swap_in(tmp: Path, dest: Path, earlier: dict | None) -> None:
    """Rename the finished folder onto DEST. An earlier publish there (`earlier`, its manifest) is moved aside,
    and then only what it wrote is deleted: anything else in DEST is carried into the new folder first."""
    if not dest.exists() and not dest.is_symlink():
        os.rename(tmp, dest)
        return
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        dest.rmdir()
        os.rename(tmp, dest)
        return
    if earlier is None:  # _check_dest lets nothing else through; a folder that changed since is not replaced
        raise NotAPublishError(f"{dest}: changed during the publish and is not an earlier publish; nothing there"
                               " was touched")
    owned = _owned(earlier)
    _keep_foreign(dest, tmp, owned)
    old = _fresh_sibling(dest, "publish-old-")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    try:
        _remove_publish(old, owned, kept_in=dest)
    except OSError as err:  # the new publish is in place; what is left of the old one is cleaned next time
        log.warning("publish: could not remove all of the earlier publish at %s (%s)", old, err)


# ---------------------------------------------------------------------------------------------- publish

def publish_run(run_dir: Path, dest: Path, *, overwrite: bool = False, skip_partial: bool = False,
                crops: bool = False, embeddings: bool = False, samples_per_shard: int = 1000,
                progress: bool = True, name: str | None = None, dry_run: bool = False,
                on_built: Callable[[Path], Any] | None = None) -> dict:
    """Publish the finished run at `run_dir` as a dataset folder at `dest` (see the module docstring).

    Returns the manifest, with `status` added: "written", or "unchanged" when DEST already held this
    exact publish (same run content, same options), in which case nothing is touched. Raises UserError
    for a run that is not one, an unfinished shard (unless `skip_partial`), or an earlier publish of other
    content at DEST (unless `overwrite`), and NotAPublishError for anything else at DEST (never replaced).
    `name` is the dataset's name in its card (default: DEST's folder name).

    `dry_run` checks DEST the same way but writes nothing there: the dataset is built in a temporary folder
    (beside DEST, removed at the end), `on_built(folder)` is called with it (or with DEST when DEST already
    holds this publish), and the status is "dry run".
    """
    run_dir, dest = Path(run_dir), Path(dest)
    if samples_per_shard < 1:
        raise UserError(f"samples_per_shard: must be at least 1, not {samples_per_shard}")
    name = name or dest.resolve().name
    _check_apart(dest, run_dir)
    shards = find_shards(run_dir, skip_partial)
    options = {"crops": bool(crops), "embeddings": bool(embeddings), "samples_per_shard": int(samples_per_shard),
               "skip_partial": bool(skip_partial), "name": name}
    fp = fingerprint(shards, options)
    if not dry_run:  # what a killed publish left: DEST put back as it was, its temp folders removed
        _restore_moved_aside(dest)
        _clean_stale(dest)
    existing, earlier = _check_dest(dest, fp, overwrite)
    if existing is not None:
        log.info("publish: %s is unchanged (same run content and options, fingerprint %s)", dest, fp[:12])
        if on_built is not None:
            on_built(dest)
        return {**existing, "status": "unchanged"}

    counts = count_splits(shards)
    if not sum(counts.values()):
        raise UserError(f"{run_dir}: no kept samples to publish")
    splits = split_order(counts)
    config = _strip_userinfo_in(_read_yaml(RunLayout(run_dir).config_file) or {})
    summary = _read_summary(run_dir)
    max_pixels = int(((config.get("image") or {}).get("max_pixels")) or 89478485)

    if dry_run:  # beside DEST when its parent exists (same disk as the real publish), else in the temp dir
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.publish-dry-",
                                        dir=dest.parent if dest.parent.is_dir() else None))
        except OSError:  # e.g. a read-only parent
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.publish-dry-"))
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_sibling(dest, "publish-")
        tmp.mkdir()  # not mkdtemp: the published folder gets the usual permissions
    writers: dict[str, SplitWriter] = {}
    try:
        files: dict[str, dict] = {}
        schema = publish_features().arrow_schema
        mtime = int(time.time())
        writers = {s: SplitWriter(tmp, s, counts[s], samples_per_shard, crops=crops, embeddings=embeddings,
                                  schema=schema, max_pixels=max_pixels, mtime=mtime, files=files) for s in splits}
        card_input = _CardInput()
        vectors = _Embeddings(run_dir) if embeddings else None
        identities: dict[str, set] = {s: set() for s in splits}
        n_stripped = 0  # samples whose URL had a user:password@ part, published without it
        total = sum(counts.values())
        with progress_bar(total=total, unit="img", desc="publish", progress=progress) as bar:
            for sample in iter_samples(shards):
                split = _split_of(sample.record.get("split"))
                row = sample_row(sample.record, split, sample.image)
                n_stripped += row["url"] != sample.record.get("url")
                writers[split].add(sample, row, vectors.get(sample) if vectors else None)
                card_input.add(sample, row)
                if row["identity_id"] is not None:
                    identities[split].add(row["identity_id"])
                bar.update()
        for writer in writers.values():
            writer.close()

        code = code_version()
        manifest = {
            "format": "facedata-publish",
            "format_version": PUBLISH_FORMAT,
            "name": name,
            "run_dir": str(run_dir.resolve()),
            "code": code,
            "code_version": " ".join(filter(None, [code["facedata"],
                                                   code["git_commit"] and f"(git {code['git_commit']})"])) or None,
            "config": config,
            "models": summary.get("models"),
            "attribute_models": summary.get("attribute_models"),
            "options": options,
            "crops": ({"enabled": True, "where": "webdataset", "scale": CROP_SCALE, "square": True,
                       "clipped_to_image": True, "face": "primary", "format": "jpg"} if crops else {"enabled": False}),
            "splits": {s: {"num_examples": counts[s], "identities": len(identities[s]),
                           "num_shards": writers[s].n_shards} for s in splits},
            "n_samples": total,
            "url_credentials_stripped": n_stripped,
            "data_files": {s: f"data/{s}-*" for s in splits},
            "features": _yaml_features(),
            "source_shards": [shard_name(i) for i in shards.ids],
            "skipped_shards": shards.skipped,
            "files": dict(sorted(files.items())),
            "fingerprint": fp,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        from facedata.publish.card import write_dataset_card

        write_dataset_card(tmp, name=name, summary=summary, config=config, manifest=manifest,
                           samples=card_input.samples(), examples=card_input.all_examples())
        for path in sorted(tmp.rglob("*")):
            rel = path.relative_to(tmp).as_posix()
            if path.is_file() and not path.is_symlink() and rel not in files and rel != MANIFEST:
                files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        manifest["files"] = dict(sorted(files.items()))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        if dry_run:
            if earlier is not None:  # what the swap would keep, so that the plan shows it too
                _keep_foreign(dest, tmp, _owned(earlier), symlink=True)
            if on_built is not None:
                on_built(tmp)
            shutil.rmtree(tmp)
        else:
            _swap_in(tmp, dest, earlier)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f["bytes"] for f in files.values())
    log.info("publish: %d samples (%s) in %d files, %.1f MB, %s %s", total,
             ", ".join(f"{s} {counts[s]}" for s in splits), len(files) + 1, size / 1e6,
             "dry run, nothing written to" if dry_run else "to", dest)
    if shards.skipped:
        log.warning("publish: %d unfinished shards skipped: %s", len(shards.skipped),
                    ", ".join(s["shard"] for s in shards.skipped))
    return {**manifest, "status": "dry run" if dry_run else "written"}


def staging_dir(run_dir: Path) -> Path:
    """Where a run is published before it goes to the Hub: beside the run, not inside it."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f"{run_dir.name}-published"


def publish(run_dir: Path, to: str | None = None, *, repo: str | None = None, private: bool = True,
            dry_run: bool = False, overwrite: bool = False, skip_partial: bool = False, crops: bool = False,
            embeddings: bool = False, samples_per_shard: int = 1000, progress: bool = True) -> dict:
    """`facedata publish`: the run as a dataset folder at `to`, or on the Hub (`hf://datasets/OWNER/NAME`
    or `repo`), built first in `staging_dir(run_dir)` and uploaded from there. `dry_run` writes nothing
    (neither the folder nor the staging folder: the dataset is built in a temporary folder, then removed)
    and, for the Hub, prints the upload plan without contacting the Hub."""
    from facedata.publish.hub import parse_destination, upload_to_hub

    destination = parse_destination(to, repo=repo)
    folder = Path(destination.path) if not destination.is_hub else staging_dir(run_dir)
    name = destination.repo_id if destination.is_hub else None
    planned: dict = {}

    def plan_upload(built: Path) -> None:
        planned["upload"] = upload_to_hub(built, destination.repo_id, private=private,
                                          revision=destination.revision, dry_run=True, shown_folder=folder)

    manifest = publish_run(run_dir, folder, overwrite=overwrite or destination.is_hub, skip_partial=skip_partial,
                           crops=crops, embeddings=embeddings, samples_per_shard=samples_per_shard,
                           progress=progress, name=name, dry_run=dry_run,
                           on_built=plan_upload if dry_run and destination.is_hub else None)
    if not destination.is_hub:
        return {"destination": str(folder), "manifest": manifest}
    if dry_run:
        upload = planned["upload"]
    else:
        upload = upload_to_hub(folder, destination.repo_id, private=private, revision=destination.revision)
    return {"destination": str(destination), "staging": str(folder), "manifest": manifest, "upload": upload}
