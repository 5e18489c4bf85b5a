"""A published split's webdataset tars as a deterministic, resumable training loader.

Layout read: `DIR/webdataset/{split}-NNNNN.tar`, each sample `KEY.jpg|png|webp` (the image),
`KEY.txt` (the face caption) and `KEY.json` (metadata, with `faces[].bbox` in image pixels and the
primary face marked `primary`).

The tars are indexed once (member offsets, from the tar headers only; cached by file name, size
and mtime) and samples are read by offset with `os.pread`, so:

- each epoch's order is a pure function of (seed, epoch): the shard order is shuffled, then the
  samples within windows of `shuffle_window` shards (default: the whole split);
- each sample's augmentation is seeded from (seed, epoch, position in the epoch), so neither the
  number of loader workers nor a resume changes what a step sees;
- resuming at step S skips straight to its batch without reading the skipped samples.

Micro-batches are exactly `batch_size` samples; the tail of an epoch that does not fill an
optimiser step is left out (the next epoch's order differs).

Errors are one line naming the file: a missing folder or split, an unreadable tar, a sample
without image or caption, an image that does not decode. Errors inside loader workers travel
back as values and are raised in the training process.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image

from facedata.core.errors import UserError
from facedata.download.imaging import ImageError, decode_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# webdataset's key/extension split: the key is the path up to the first dot of the file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_INDEX_VERSION = 2
_FIELDS = ("img_ext", "img_ofs", "img_len", "txt_ofs", "txt_len", "json_ofs", "json_len")


@dataclass
class SplitIndex:
    """Where every sample of a split lies in its tars. Samples are grouped by tar, in tar order;
    `json_ofs` is -1 for a sample without metadata."""

    split: str
    tars: list[Path]
    tar_id: np.ndarray  # int32 [N]
    keys: np.ndarray  # str [N]
    img_ext: np.ndarray  # int64 [N], the image's extension as an index into IMAGE_EXTS
    img_ofs: np.ndarray  # int64 [N], byte offsets of member data
    img_len: np.ndarray
    txt_ofs: np.ndarray
    txt_len: np.ndarray
    json_ofs: np.ndarray
    json_len: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def member(self, i: int, ext: str = "") -> str:
        """`tar_path:KEY.ext` (ext "img": the image's own extension), for messages."""
        if ext == "img":
            ext = IMAGE_EXTS[int(self.img_ext[i])]
        return f"{self.tars[self.tar_id[i]]}:{self.keys[i]}{'.' + ext if ext else ''}"


def split_tars(data_dir: str | Path, split: str) -> list[Path]:
    """The split's tars, sorted; one-line UserError when the folder, or the split, is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data.dir: {data_dir}: no such folder (a dataset written by facedata publish)")
    wds = data_dir / "webdataset"
    if not wds.is_dir():
        raise UserError(f"data.dir: {data_dir}: no webdataset/ folder in it (is it a published facedata dataset?)")
    tars = sorted(wds.glob(f"{split}-*.tar"))
    if not tars:
        found = sorted({p.name.rsplit("-", 1)[0] for p in wds.glob("*-*.tar")})
        have = f"splits there: {', '.join(found)}" if found else "it holds no tars"
        raise UserError(f"data.split: {wds}: no {split}-*.tar shards ({have})")
    return tars


def _scan_tar(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {ext: (data offset, size)} from the tar's headers (member data is skipped, not read)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _KEY_EXT.match(member.name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{path}: not a readable tar ({' '.join(str(err).split()) or type(err).__name__})") from None
    size = path.stat().st_size
    for key, members in samples.items():
        if any(ofs + n > size for ofs, n in members.values()):
            raise UserError(f"{path}: member {key} runs past the end of the file (truncated tar)")
    return samples


def _index_tar(path: Path) -> dict[str, list]:
    rows: dict[str, list] = {"keys": [], **{f: [] for f in _FIELDS}}
    for key, members in _scan_tar(path).items():
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if image_ext is None:
            raise UserError(f"{path}: sample {key} has no image ({'/'.join('.' + e for e in IMAGE_EXTS)})")
        if "txt" not in members:
            raise UserError(f"{path}: sample {key} has no .txt caption")
        json_ofs, json_len = members.get("json", (-1, 0))
        values = (IMAGE_EXTS.index(image_ext), *members[image_ext], *members["txt"], json_ofs, json_len)
        for field, value in zip(_FIELDS, values):
            rows[field].append(value)
        rows["keys"].append(key)
    return rows


def _fingerprint(tars: list[Path]) -> list[list]:
    return [[p.name, (st := p.stat()).st_size, st.st_mtime_ns] for p in tars]


def index_split(data_dir: str | Path, split: str, cache_dir: str | Path | None = None) -> SplitIndex:
    """Index a split's tars. With `cache_dir`, the index is saved there and reused while the tars'
    names, sizes and mtimes are unchanged (headers of a large split take minutes to scan)."""
    tars = split_tars(data_dir, split)
    fingerprint = _fingerprint(tars)
    cache = Path(cache_dir) / f"{split}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if json.loads(str(z["meta"])) == {"version": _INDEX_VERSION, "tars": fingerprint}:
                    return SplitIndex(split, tars, z["tar_id"], z["keys"], *(z[f] for f in _FIELDS))
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it
    tar_id: list[np.ndarray] = []
    keys: list[str] = []
    cols: dict[str, list[int]] = {f: [] for f in _FIELDS}
    for i, path in enumerate(tars):
        rows = _index_tar(path)
        tar_id.append(np.full(len(rows["keys"]), i, dtype=np.int32))
        keys += rows["keys"]
        for f in _FIELDS:
            cols[f] += rows[f]
    index = SplitIndex(split, tars, np.concatenate(tar_id), np.array(keys, dtype=str),
                       *(np.array(cols[f], dtype=np.int64) for f in _FIELDS))
    if len(index) == 0:
        raise UserError(f"data.split: {tars[0].parent}: the {split} tars hold no samples")
    if cache is not None:
        from facedata.core.shards import atomic_path

        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, meta=json.dumps({"version": _INDEX_VERSION, "tars": fingerprint}),
                         tar_id=index.tar_id, keys=index.keys, **{f_: getattr(index, f_) for f_ in _FIELDS})
    return index


def epoch_order(index: SplitIndex, seed: int, epoch: int, shuffle_window: int | None = None) -> np.ndarray:
    """The sample ids of one epoch, in order: a pure function of (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    if shuffle_window is None:
        return rng.permutation(len(index))
    n_tars = len(index.tars)
    bounds = np.searchsorted(index.tar_id, np.arange(n_tars + 1))
    order = rng.permutation(n_tars)
    parts = []
    for w in range(0, n_tars, shuffle_window):
        ids = np.concatenate([np.arange(bounds[t], bounds[t + 1]) for t in order[w:w + shuffle_window]])
        parts.append(rng.permutation(ids))
    return np.concatenate(parts)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of `epoch`."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class LoadFailure:
    """A sample that could not be loaded, carried back from a worker as a value."""

    message: str


class FaceTextDataset(torch.utils.data.Dataset):
    """Samples of a split, addressed by (sample id, augmentation seed) pairs from `StepBatches`.

    Item: (image tensor from `transform`, token ids [context_length]); a `LoadFailure` when the
    sample cannot be read. `load_image`, `caption` and `metadata` read one sample directly.
    """

    def __init__(self, index: SplitIndex, tokenizer: Callable | None, transform: Callable | None,
                 use_crops: bool = False, crop_scale: float = 1.5, max_pixels: int = 89_478_485,
                 decode_side: int | None = None):
        self.index = index
        self.tokenizer = tokenizer
        self.transform = transform
        self.use_crops = use_crops
        self.crop_scale = crop_scale
        self.max_pixels = max_pixels
        # Decode JPEGs at a reduced scale that still gives at least this many pixels across the
        # region used (the whole image or the face crop); None decodes at full size.
        self.decode_side = decode_side
        # Open tar descriptors, least recently used first. Forked workers inherit them; pread
        # takes an explicit offset, so processes sharing a descriptor do not disturb each other.
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    # -- raw members ------------------------------------------------------------------------

    def _fd(self, tar: int) -> int:
        fd = self._fds.pop(tar, None)
        if fd is None:
            fd = os.open(self.index.tars[tar], os.O_RDONLY)
            if len(self._fds) >= 64:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[tar] = fd
        return fd

    def _read(self, i: int, ofs: int, n: int, ext: str) -> bytes:
        try:
            data = os.pread(self._fd(int(self.index.tar_id[i])), int(n), int(ofs))
        except OSError as err:
            raise UserError(f"{self.index.member(i, ext)}: cannot read ({err.strerror})") from None
        if len(data) != n:
            raise UserError(f"{self.index.member(i, ext)}: truncated ({len(data)} of {n} bytes)")
        return data

    def caption(self, i: int) -> str:
        data = self._read(i, self.index.txt_ofs[i], self.index.txt_len[i], "txt")
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UserError(f"{self.index.member(i, 'txt')}: caption is not UTF-8 text") from None

    def metadata(self, i: int) -> dict[str, Any]:
        if self.index.json_ofs[i] < 0:
            return {}
        data = self._read(i, self.index.json_ofs[i], self.index.json_len[i], "json")
        try:
            meta = json.loads(data)
        except ValueError as err:
            raise UserError(f"{self.index.member(i, 'json')}: not valid JSON ({err})") from None
        if not isinstance(meta, dict):
            raise UserError(f"{self.index.member(i, 'json')}: expected a JSON object")
        return meta

    def face_box(self, i: int) -> list[float] | None:
        """The primary face's bbox [x1, y1, x2, y2] in the stored image's pixels; None when the
        sample lists no face (or no box for it).

        A dataset published with `crops` stores the face crop as the image, with the crop's place
        in the original image as `crop_box`; the face boxes stay in the original's pixels and are
        moved into the crop's here."""
        meta = self.metadata(i)
        faces = meta.get("faces") or []
        if not isinstance(faces, list):
            raise UserError(f"{self.index.member(i, 'json')}: faces: expected a list")
        face = next((f for f in faces if isinstance(f, dict) and f.get("primary")), faces[0] if faces else None)
        if not isinstance(face, dict) or face.get("bbox") is None:
            return None
        box = face["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
                and box[2] > box[0] and box[3] > box[1]):
            raise UserError(f"{self.index.member(i, 'json')}: primary face has no valid bbox (got {box!r})")
        dx, dy = (float(v) for v in (meta.get("crop_box") or (0, 0))[:2])
        return [float(box[0]) - dx, float(box[1]) - dy, float(box[2]) - dx, float(box[3]) - dy]

    # -- images -----------------------------------------------------------------------------

    def crop_region(self, box: list[float], width: int, height: int) -> tuple[float, float, float, float]:
        """The face box grown `crop_scale` times around its centre, as a square on the box's longer
        side (so resizing to the square model input does not squash the face), clipped to the image."""
        x1, y1, x2, y2 = box
        side = self.crop_scale * max(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        return (max(0.0, cx - side / 2), max(0.0, cy - side / 2),
                min(float(width), cx + side / 2), min(float(height), cy + side / 2))

    def load_image(self, i: int) -> Image.Image:
        """The sample's RGB image (EXIF orientation applied), cut to the grown primary face box in
        crops mode."""
        data = self._read(i, self.index.img_ofs[i], self.index.img_len[i], "img")
        box = self.face_box(i) if self.use_crops else None
        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
                if header.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPS_SIDES:
                    width, height = height, width
        except Exception as err:  # Pillow raises many types on bad headers
            raise UserError(f"{self.index.member(i, 'img')}: not a readable image ({' '.join(str(err).split())})") \
                from None
        region = self.crop_region(box, width, height) if box else (0.0, 0.0, float(width), float(height))
        draft = None
        if self.decode_side:
            used = min(region[2] - region[0], region[3] - region[1])
            scale = min(1.0, self.decode_side / max(used, 1.0))
            draft = (max(1, int(width * scale)), max(1, int(height * scale)))
        try:
            img = decode_rgb(data, self.max_pixels, draft)
        except ImageError as err:
            raise UserError(f"{self.index.member(i, 'img')}: {err}") from None
        if box is None:
            return img
        sx, sy = img.width / width, img.height / height  # a draft decode is smaller than the header says
        x1, y1, x2, y2 = region
        return img.crop((round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)))

    # -- items ------------------------------------------------------------------------------

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | LoadFailure:
        i, seed = item
        try:
            img = self.load_image(i)
            tokens = self.tokenizer([self.caption(i)])[0]
        except UserError as err:
            return LoadFailure(str(err))
        # The transform draws from torch's global RNG: seed it for this sample only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image = self.transform(img)
        return image, tokens

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self) -> dict:  # workers started by spawn open their own descriptors
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()
        return state


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor] | LoadFailure:
    for item in items:
        if isinstance(item, LoadFailure):
            return item
    return torch.stack([img for img, _ in items]), torch.stack([tok for _, tok in items])


class StepBatches(torch.utils.data.Sampler):
    """The micro-batches of optimiser steps [start_step, total_steps): each step takes grad_accum
    micro-batches of batch_size (sample id, augmentation seed) pairs, in epoch order."""

    def __init__(self, index: SplitIndex, batch_size: int, grad_accum: int, steps_per_epoch: int,
                 start_step: int, total_steps: int, seed: int, shuffle_window: int | None = None):
        if steps_per_epoch * grad_accum * batch_size > len(index):
            raise ValueError("an epoch holds more micro-batches than the split has samples")
        self.index, self.batch_size, self.grad_accum = index, batch_size, grad_accum
        self.steps_per_epoch, self.start_step, self.total_steps = steps_per_epoch, start_step, total_steps
        self.seed, self.shuffle_window = seed, shuffle_window

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        bs, epoch_seen, order = self.batch_size, None, None
        for step in range(self.start_step, self.total_steps):
            epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
            if epoch != epoch_seen:
                order, epoch_seen = epoch_order(self.index, self.seed, epoch, self.shuffle_window), epoch
            for b in range(step_in_epoch * self.grad_accum, (step_in_epoch + 1) * self.grad_accum):
                yield [(int(order[p]), sample_seed(self.seed, epoch, p)) for p in range(b * bs, (b + 1) * bs)]


def _worker_init(_worker_id: int) -> None:
    """Forget the threading-exit callbacks inherited from the training process. A forked worker
    would run them when it exits, and Prefect's (registered once a flow has run) fail in a fork
    (AssertionError in its service drain, prefect 3.8), so every worker exited with status 1."""
    callbacks = getattr(threading, "_threading_atexits", None)
    if isinstance(callbacks, list):
        callbacks.clear()


def step_loader(dataset: FaceTextDataset, batches: StepBatches, workers: int = 0,
                pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches (images, tokens) `batches` lists, loaded by `workers` processes started
    once for the whole run. A sample that cannot be loaded raises its one-line UserError here,
    in the calling process."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
        # Its own generator: creating a loader must not draw from the global RNG the model uses.
        generator=torch.Generator().manual_seed(batches.seed),
        prefetch_factor=4 if workers else None, worker_init_fn=_worker_init if workers else None,
    )
    for batch in loader:
        if isinstance(batch, LoadFailure):
            raise UserError(batch.message)
        yield batch
