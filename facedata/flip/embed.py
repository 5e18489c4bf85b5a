"""Embedding with a trained FLIP model: load a checkpoint, embed texts, images and a published split.

- `load_checkpoint(path)`: a facedata FLIP checkpoint (`RUN/checkpoints/step_NNNNNNNN.pt`, or the run
  folder `RUN` for its newest one) as a `FlipCheckpoint`: the model in eval mode on a device, its
  tokenizer, its eval transform, and how training read images (whole, or the primary face crop).
- `embed_texts`, `embed_images`: L2-normalised float32 embeddings, in batches, without gradients.
- `embed_split`: every image of a published split (in tar order), read the way training read them.

Every function taking a model accepts a `FlipCheckpoint` or a `facedata.flip.model.FlipModel` (any
object with `model`, `tokenizer` and `eval_transform`); inputs go to the model's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from facedata.core.errors import UserError
from facedata.flip.model import (  # makes torchvision importable
    FlipModel,
    build_flip_model,
)
from facedata.download.imaging import ImageError, decode_rgb
from facedata.core.shards import file_sha256

__all__ = ["FlipCheckpoint", "SplitEmbeddings", "embed_images", "embed_split", "embed_tensors", "embed_texts",
           "face_region", "file_sha256", "load_checkpoint", "read_image_bytes", "resolve_checkpoint",
           "resolve_device"]

_MAX_PIXELS = 89_478_485


@dataclass
class FlipCheckpoint:
    model: torch.nn.Module  # open_clip CLIP in eval mode, on `device`
    tokenizer: Callable[[list[str]], torch.Tensor]
    eval_transform: Callable  # PIL RGB image -> normalised [3, H, W] tensor
    device: torch.device
    path: Path  # the checkpoint file
    sha256: str  # of the checkpoint file
    step: int | None
    model_config: dict[str, Any]
    image_size: int | tuple[int, int]
    use_crops: bool = False  # how training read images (data.use_crops, data.crop_scale)
    crop_scale: float = 1.5
    config: dict[str, Any] = field(default_factory=dict)  # the training config, as saved

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


def resolve_device(name: str | torch.device = "auto", setting: str = "device") -> torch.device:
    """auto: CUDA when torch sees it, else CPU; cuda without CUDA is a UserError naming `setting`
    (the config key or option the device came from)."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{setting}: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file: `path` itself, or for a training run folder its newest
    checkpoints/step_NNNNNNNN.pt. One-line UserError when there is none."""
    from facedata.flip.train import list_checkpoints

    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path.parent)  # the run folder, or its checkpoints/
        if not found:
            raise UserError(f"checkpoint: {path}: a folder without checkpoints/step_*.pt (not a FLIP run folder)")
        return found[-1]
    raise UserError(f"checkpoint: {path}: no such file or folder")


def read_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """(checkpoint file, its state) of a facedata FLIP checkpoint: a file, or a run folder's newest.
    One-line UserError for anything else."""
    from facedata.flip.train import CHECKPOINT_FORMAT

    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated file, not a torch file, a refused pickle
        raise UserError(f"checkpoint: {path}: cannot read ({' '.join(str(err).split())[:200]})") from None
    if (not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "state_dict" not in state
            or "config" not in state):
        raise UserError(f"checkpoint: {path}: not a facedata FLIP checkpoint (one written by facedata train)")
    return path, state


def load_checkpoint(path: str | Path, device: str | torch.device = "auto") -> FlipCheckpoint:
    """A facedata FLIP checkpoint (a file, or a run folder for its newest) ready for inference.
    The architecture comes from the config saved in the checkpoint; nothing is downloaded."""
    from facedata.flip.config import ModelSection

    path, state = read_checkpoint(path)
    device = resolve_device(device)
    config = state.get("config") or {}
    try:
        section = ModelSection.model_validate({**config["model"], "pretrained": None})
    except Exception as err:  # noqa: BLE001 - a ValidationError or a missing key
        raise UserError(f"checkpoint: {path}: its model config is not usable "
                        f"({' '.join(str(err).split())[:200]})") from None
    flip = build_flip_model(section)
    try:
        flip.model.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise UserError(f"checkpoint: {path}: weights do not fit its model config "
                        f"({' '.join(str(err).split())[:200]})") from None
    flip.model.to(device).eval()
    data = config.get("data") or {}
    return FlipCheckpoint(model=flip.model, tokenizer=flip.tokenizer, eval_transform=flip.eval_transform,
                          device=device, path=path, sha256=file_sha256(path), step=state.get("step"),
                          model_config=flip.model_config, image_size=flip.image_size,
                          use_crops=bool(data.get("use_crops", False)),
                          crop_scale=float(data.get("crop_scale", 1.5)), config=config)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _embed_dim(flip) -> int:
    return int((getattr(flip, "model_config", None) or {}).get("embed_dim", 0))


def _autocast(device: torch.device):
    # fp32 everywhere (TF32 matmuls on CUDA): embeddings agree across devices to ~1e-3.
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def embed_texts(flip: FlipCheckpoint | FlipModel, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """[N, D] float32, unit length. Texts longer than the context are cut by the tokenizer."""
    model = flip.model
    device = _device_of(model)
    out = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(texts), batch_size):
            tokens = flip.tokenizer(list(texts[i:i + batch_size])).to(device)
            with _autocast(device):
                out.append(model.encode_text(tokens, normalize=True).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, _embed_dim(flip)), np.float32)


def _as_rgb(image: Image.Image | bytes) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        return decode_rgb(bytes(image), _MAX_PIXELS)
    except ImageError as err:
        raise UserError(f"image: not a readable image ({err})") from None


@torch.no_grad()
def embed_tensors(flip: FlipCheckpoint | FlipModel, batches: Iterator[torch.Tensor]) -> np.ndarray:
    """Embeddings of already-transformed image batches ([B, 3, H, W]), concatenated."""
    model = flip.model
    device = _device_of(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in batches:
            with _autocast(device):
                out.append(model.encode_image(batch.to(device, non_blocking=True), normalize=True).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, _embed_dim(flip)), np.float32)


def face_region(box: Sequence[float], width: int, height: int, scale: float = 1.5) -> tuple[float, ...]:
    """The face box [x1, y1, x2, y2] grown `scale` times around its centre as a square on its longer
    side, clipped to the image: the region training cuts in crops mode (FaceTextDataset.crop_region)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = scale * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return (max(0.0, cx - side / 2), max(0.0, cy - side / 2),
            min(float(width), cx + side / 2), min(float(height), cy + side / 2))


def embed_images(flip: FlipCheckpoint | FlipModel, images: Sequence[Image.Image | bytes], batch_size: int = 64,
                 boxes: Sequence[Sequence[float] | None] | None = None,
                 crop_scale: float | None = None) -> np.ndarray:
    """[N, D] float32, unit length, for PIL images or encoded image bytes, through the model's eval
    transform. With `boxes` (one face box [x1, y1, x2, y2] in image pixels, or None, per image),
    each image is first cut to its box grown `crop_scale` times (default: the checkpoint's
    data.crop_scale), as training in crops mode does; pass the primary faces' boxes for a
    checkpoint trained with data.use_crops."""
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"embed_images: {len(images)} images but {len(boxes)} boxes")
    scale = crop_scale if crop_scale is not None else getattr(flip, "crop_scale", 1.5)

    def prepared(i: int) -> Image.Image:
        img = _as_rgb(images[i])
        box = boxes[i] if boxes is not None else None
        if box is not None:
            x1, y1, x2, y2 = face_region(box, img.width, img.height, scale)
            img = img.crop((round(x1), round(y1), round(x2), round(y2)))
        return img

    def batches():
        for start in range(0, len(images), batch_size):
            yield torch.stack([flip.eval_transform(prepared(i))
                               for i in range(start, min(start + batch_size, len(images)))])
    return embed_tensors(flip, batches())


# --------------------------------------------------------------------------------------------- splits

@dataclass
class SplitEmbeddings:
    split: str
    keys: list[str]  # in tar order
    embeddings: np.ndarray  # [N, D] float32, unit length
    captions: list[str]  # KEY.txt, the face caption
    meta: dict[str, list]  # the requested KEY.json fields, one list each (None where absent)
    index: Any  # facedata.flip.data.SplitIndex: where each sample lies in the tars


class _Images(torch.utils.data.Dataset):
    """Sample i -> (eval tensor, caption, selected metadata), or a LoadFailure."""

    def __init__(self, dataset, transform: Callable, meta_fields: Sequence[str]):
        self.dataset, self.transform, self.meta_fields = dataset, transform, tuple(meta_fields)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        from facedata.flip.data import LoadFailure

        try:
            img = self.dataset.load_image(i)
            caption = self.dataset.caption(i)
            meta = self.dataset.metadata(i) if self.meta_fields else {}
        except UserError as err:
            return LoadFailure(str(err))
        return self.transform(img), caption, {f: meta.get(f) for f in self.meta_fields}


def _collate(items):
    from facedata.flip.data import LoadFailure

    for item in items:
        if isinstance(item, LoadFailure):
            return item
    return torch.stack([t for t, _, _ in items]), [c for _, c, _ in items], [m for _, _, m in items]


def embed_split(flip: FlipCheckpoint | FlipModel, data_dir: str | Path, split: str, *, batch_size: int = 64,
                workers: int = 0, use_crops: bool | None = None, crop_scale: float | None = None,
                meta_fields: Sequence[str] = (), progress: bool = False,
                index_cache: str | Path | None = None) -> SplitEmbeddings:
    """Embed every image of a published split, in tar order. Images are read as the checkpoint's
    training read them (its data.use_crops and crop_scale; a FlipModel: whole images) unless
    `use_crops`/`crop_scale` say otherwise. `meta_fields`: KEY.json fields to return per sample.
    A missing split or an unreadable sample raises a one-line UserError."""
    from facedata.core.progress import progress_bar

    from facedata.flip.data import (
        FaceTextDataset,
        LoadFailure,
        _worker_init,
        index_split,
    )

    index = index_split(data_dir, split, cache_dir=index_cache)
    use_crops = getattr(flip, "use_crops", False) if use_crops is None else use_crops
    crop_scale = getattr(flip, "crop_scale", 1.5) if crop_scale is None else crop_scale
    size = flip.image_size if isinstance(flip.image_size, int) else max(flip.image_size)
    dataset = FaceTextDataset(index, None, None, use_crops=use_crops, crop_scale=crop_scale,
                              decode_side=math.ceil(size))
    items = _Images(dataset, flip.eval_transform, meta_fields)
    batches = [list(range(i, min(i + batch_size, len(index)))) for i in range(0, len(index), batch_size)]
    device = _device_of(flip.model)
    loader = torch.utils.data.DataLoader(
        items, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None)
    captions: list[str] = []
    meta: dict[str, list] = {f: [] for f in meta_fields}

    def tensors():
        with progress_bar(total=len(index), desc=f"embed {split}", unit="img", progress=progress,
                  dynamic_ncols=True) as bar:
            for batch in loader:
                if isinstance(batch, LoadFailure):
                    raise UserError(batch.message)
                images, texts, metas = batch
                captions.extend(texts)
                for f in meta_fields:
                    meta[f].extend(m[f] for m in metas)
                yield images
                bar.update(len(texts))

    embeddings = embed_tensors(flip, tensors())
    return SplitEmbeddings(split=split, keys=[str(k) for k in index.keys], embeddings=embeddings,
                           captions=captions, meta=meta, index=index)


def read_image_bytes(tar: str | Path, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of a tar (a member's data, e.g. from SplitIndex.img_ofs/img_len)."""
    with open(tar, "rb") as f:
        f.seek(int(offset))
        data = f.read(int(length))
    if len(data) != length:
        raise UserError(f"{tar}: truncated at offset {offset} ({len(data)} of {length} bytes); "
                        "the dataset changed since it was indexed")
    return data
