"""The FLIP model: an open_clip CLIP built from the training config, its tokenizer and transforms.

The model is built from an open_clip model config (a named architecture's, a dict, or both
merged; see `ModelSection.resolved`) with open_clip's own classes, so it stays loadable by
open_clip. Nothing is ever downloaded: no pretrained tags, timm and Hugging Face towers are
refused at config load, and `pretrained` must be a local file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facedata.core.errors import UserError
from facedata.flip.config import AugmentSection, ModelSection
from facedata.core.torchvision_compat import ensure_torchvision

ensure_torchvision()  # before open_clip imports torchvision

import open_clip  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

__all__ = ["FlipModel", "build_flip_model", "create_model", "eval_transform", "get_tokenizer",
           "load_pretrained", "train_transform"]


@dataclass
class FlipModel:
    model: torch.nn.Module  # open_clip CLIP (or CustomTextCLIP); forward returns a dict
    tokenizer: Callable[[list[str]], torch.Tensor]  # captions -> [N, context_length] token ids
    train_transform: Callable  # PIL RGB image -> normalised [3, H, W] float tensor, augmented
    eval_transform: Callable  # the same without augmentation (resize shorter side, centre crop)
    model_config: dict[str, Any]  # the open_clip model config the model was built from
    image_size: int | tuple[int, int]


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:limit]


def create_model(cfg: ModelSection) -> torch.nn.Module:
    """A randomly initialised open_clip model (fp32, on CPU) for the config; its weights come from
    torch's global RNG, so seed it first for a reproducible start."""
    model_cfg = cfg.resolved()
    vision = model_cfg["vision_cfg"]
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False  # never fetch timm weights
    custom_text = bool(model_cfg.pop("custom_text", False))
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        model = cls(**model_cfg)
    except Exception as err:  # an unknown key or an impossible shape, from deep inside open_clip
        raise UserError(f"model: open_clip cannot build this architecture: {_one_line(err)}") from None
    model.output_dict = True
    return model


def load_pretrained(model: torch.nn.Module, path: str | Path) -> None:
    """Load a local CLIP checkpoint into `model` (strict): a state dict, or a dict holding one under
    'state_dict' (open_clip's training checkpoints and facedata's). open_clip's loader also adapts
    old text-tower layouts and resizes positional embeddings to the model's image and context size.
    Raises a one-line UserError for a missing, unreadable or mismatched file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.pretrained: {path}: no such file (a local CLIP checkpoint; nothing is downloaded)")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except RuntimeError as err:
        text = " ".join(str(err).split())
        if "Error(s) in loading state_dict" in text:
            raise UserError(f"model.pretrained: {path}: weights do not fit the model: {text[:300]}") from None
        raise UserError(f"model.pretrained: {path}: cannot load: {_one_line(err)}") from None
    except Exception as err:  # truncated file, not a torch file, a pickle that weights_only refuses
        raise UserError(f"model.pretrained: {path}: cannot load: {_one_line(err)}") from None


def get_tokenizer(cfg: ModelSection) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for the model: its BPE vocabulary ships inside open_clip (offline)."""
    text_cfg = cfg.resolved()["text_cfg"]
    context_length = text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
    try:
        if cfg.name is not None and cfg.config is None:
            return open_clip.get_tokenizer(cfg.name, context_length=context_length)
        return open_clip.SimpleTokenizer(context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))
    except Exception as err:  # e.g. a SigLIP name, whose tokenizer comes from the Hugging Face hub
        raise UserError(f"model: cannot load the tokenizer offline: {_one_line(err)}") from None


def _size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])


def _norm(cfg: ModelSection) -> T.Normalize:
    return T.Normalize(mean=cfg.mean or open_clip.OPENAI_DATASET_MEAN, std=cfg.std or open_clip.OPENAI_DATASET_STD)


def train_transform(cfg: ModelSection) -> Callable:
    """Augmentation for training (see AugmentSection for why it is mild). Random draws use torch's
    global RNG: the data loader seeds it per sample, so a sample's augmentation is reproducible."""
    aug: AugmentSection = cfg.augment
    size = _size(cfg.resolved()["vision_cfg"].get("image_size", 224))
    if not aug.enabled:
        return eval_transform(cfg)
    steps: list[Callable] = [T.RandomResizedCrop(size, scale=aug.scale, ratio=aug.ratio,
                                                 interpolation=InterpolationMode.BICUBIC)]
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0))
    steps += [T.ToTensor(), _norm(cfg)]
    return T.Compose(steps)


def eval_transform(cfg: ModelSection) -> Callable:
    """open_clip's inference preprocessing: resize the shorter side, centre crop, normalise."""
    size = _size(cfg.resolved()["vision_cfg"].get("image_size", 224))
    return T.Compose([T.Resize(min(size), interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), _norm(cfg)])


def build_flip_model(cfg: ModelSection) -> FlipModel:
    """Model (pretrained weights loaded when configured), tokenizer and transforms."""
    model = create_model(cfg)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    model_cfg = cfg.resolved()
    return FlipModel(model=model, tokenizer=get_tokenizer(cfg), train_transform=train_transform(cfg),
                     eval_transform=eval_transform(cfg), model_config=model_cfg,
                     image_size=model_cfg["vision_cfg"].get("image_size", 224))
