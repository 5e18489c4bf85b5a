"""FLIP training configuration: YAML validated at load, in the same one-line error style as the
curation config, e.g.::

    configs/flip_tiny.yaml: training.lr: expected a number greater than 0 (got -1)

Sections: `data` (which published dataset and split, whole images or face crops), `model` (an
open_clip architecture by name and/or as a config dict, input size, an optional local pretrained
checkpoint, augmentation), `training` (length, batch, optimiser, schedule, precision, seed) and
`output` (run folder, checkpoints).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from facedata.core.config import _apply_override, _first_error, read_yaml_mapping


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Section):
    # The published dataset's folder (`DEST`, holding webdataset/{split}-NNNNN.tar).
    dir: str
    split: str = "train"
    # False: whole images. True: the primary face, cut at load time from its box in KEY.json,
    # grown crop_scale times around its centre (square, clipped to the image); an image whose
    # metadata lists no face is used whole. A dataset published with crops holds only the crops:
    # they are used in either mode (re-cut to crop_scale in crops mode).
    use_crops: bool = False
    crop_scale: float = Field(1.5, ge=1.0, le=4.0)
    # Shards whose samples are shuffled together at a time (each epoch also shuffles the shard
    # order); None shuffles across the whole split. Small windows keep reads within a few tars,
    # for slow random access (network disks); the split's tars are read by offset either way.
    shuffle_window: int | None = Field(None, ge=1)
    # Pillow's decompression-bomb limit for the stored images.
    max_pixels: int = Field(89_478_485, gt=0)

    @field_validator("split")
    @classmethod
    def _plain_split(cls, split: str) -> str:
        if not split or "/" in split or "*" in split:
            raise ValueError(f"expected a split name such as train (got {split!r})")
        return split


class AugmentSection(_Section):
    """Training augmentation, kept mild because captions state what the image shows.

    - Random resized crop with scale >= 0.8: a harder crop can cut away the face (or one of the
      faces a caption counts), or the hair and glasses it describes.
    - Horizontal flip is label-preserving here: facedata captions never say left or right (pose
      is "turned slightly to one side", keypoints are not in captions).
    - Colour jitter is light (brightness, contrast, saturation only): captions state hair colour
      and lighting ("dim", "overexposed", "well lit"), so no hue shift and no grayscale.
    """

    enabled: bool = True
    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    color_jitter: float = Field(0.1, ge=0, le=0.5)

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered(cls, pair: tuple[float, float]) -> tuple[float, float]:
        if not 0 < pair[0] <= pair[1]:
            raise ValueError(f"expected 0 < low <= high (got {list(pair)})")
        return pair


@lru_cache(maxsize=1)
def named_architectures() -> dict[str, Path]:
    """open_clip's built-in model configs by name, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    return {p.stem: p for p in sorted(folder.glob("*.json"))}


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class ModelSection(_Section):
    # A named open_clip architecture (e.g. ViT-B-16; see open_clip.list_models()).
    name: str | None = None
    # An open_clip model config (embed_dim, vision_cfg, text_cfg, ...); with `name`, merged over
    # that architecture's config, so it can change a few values (e.g. vision_cfg.patch_dropout).
    config: dict[str, Any] | None = None
    # Input side in pixels and text context length; None keeps the architecture's.
    image_size: int | None = Field(None, ge=16)
    context_length: int | None = Field(None, ge=8)
    # A local CLIP checkpoint: a state dict, or a checkpoint holding one under 'state_dict'
    # (open_clip's and facedata's own). Names that would be downloaded are not accepted.
    pretrained: str | None = None
    # Normalisation; None: OpenAI CLIP's mean and std (open_clip's default).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    augment: AugmentSection = AugmentSection()

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str | None) -> str | None:
        if name is not None and name not in named_architectures():
            close = [n for n in named_architectures() if name.lower() in n.lower()][:5]
            hint = f"; similar: {', '.join(close)}" if close else "; see open_clip.list_models()"
            raise ValueError(f"unknown open_clip architecture {name!r}{hint}")
        return name

    @model_validator(mode="after")
    def _check_architecture(self) -> ModelSection:
        if self.name is None and self.config is None:
            raise ValueError("set name (an open_clip architecture) or config (an open_clip model config)")
        cfg = self.resolved()
        for key in ("vision_cfg", "text_cfg"):
            if not isinstance(cfg.get(key), dict):
                raise ValueError(f"config.{key}: expected a mapping of open_clip {key} fields")
        if not isinstance(cfg.get("embed_dim"), int) or cfg["embed_dim"] <= 0:
            raise ValueError("config.embed_dim: expected a positive integer")
        text = cfg["text_cfg"]
        for key in ("hf_model_name", "hf_tokenizer_name"):
            if text.get(key):
                raise ValueError(f"config.text_cfg.{key}: Hugging Face text towers download weights; "
                                 "use open_clip's own text transformer")
        if "multimodal_cfg" in cfg:
            raise ValueError("config.multimodal_cfg: CoCa models are not supported (FLIP trains with ClipLoss)")
        if cfg.get("vision_cfg", {}).get("timm_model_name") and cfg["vision_cfg"].get("timm_model_pretrained"):
            raise ValueError("config.vision_cfg.timm_model_pretrained: would download weights; "
                             "use model.pretrained with a local checkpoint")
        return self

    def resolved(self) -> dict[str, Any]:
        """The open_clip model config this section describes: the named architecture's, `config`
        merged over it, then image_size and context_length applied."""
        cfg: dict[str, Any] = {}
        if self.name is not None:
            cfg = json.loads(named_architectures()[self.name].read_text(encoding="utf-8"))
        cfg = _deep_merge(cfg, self.config or {})
        if self.image_size is not None:
            cfg.setdefault("vision_cfg", {})["image_size"] = self.image_size
        if self.context_length is not None:
            cfg.setdefault("text_cfg", {})["context_length"] = self.context_length
        return cfg


class TrainingSection(_Section):
    # Length: exactly one of epochs (passes over the split) and steps (optimiser steps).
    epochs: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    # Samples per forward pass; an optimiser step sees batch_size * grad_accum samples, and the
    # contrastive loss compares all of them (open_clip's feature-caching accumulation).
    batch_size: int = Field(64, gt=0)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0, description="Peak learning rate, after warmup.")
    weight_decay: float = Field(0.2, ge=0, description="AdamW decay; never on norms, biases, logit_scale.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    # Linear warmup over warmup_steps, then cosine decay to 0 at the last step.
    warmup_steps: int = Field(0, ge=0)
    grad_clip_norm: float | None = Field(None, gt=0)
    # fp32 | bf16 (bfloat16 autocast) | amp (float16 autocast + gradient scaling). Mixed
    # precision is used on CUDA only; on CPU training runs in fp32 whatever this says.
    precision: Literal["fp32", "bf16", "amp"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    # DataLoader worker processes (0: load in the training process). The order and augmentation
    # of samples do not depend on it.
    workers: int = Field(2, ge=0)
    # Torch CPU threads; None leaves torch's default.
    threads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_length(self) -> TrainingSection:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("set exactly one of epochs and steps")
        return self


class OutputSection(_Section):
    dir: str = "runs/flip"
    # Save a checkpoint every this many optimiser steps (and always at the end).
    checkpoint_every: int = Field(1000, ge=1)
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    # Continue from the newest checkpoint in dir when there is one (rerun the same command to resume).
    resume: bool = True


class TrainConfig(_Section):
    data: DataSection
    model: ModelSection
    training: TrainingSection = TrainingSection(steps=1000)
    output: OutputSection = OutputSection()


def train_config_from_dict(data: dict, source: str = "<config>", overrides: list[str] = ()) -> TrainConfig:
    data = copy.deepcopy(data)
    for item in overrides:
        _apply_override(data, item, source)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise _first_error(source, err) from None


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read and validate a training YAML. data.dir and model.pretrained, when relative, are
    resolved against the config file's folder when they exist there (as input.path is)."""
    path = Path(path)
    cfg = train_config_from_dict(read_yaml_mapping(path), str(path), overrides)
    cfg.data.dir = _beside(path, cfg.data.dir)
    if cfg.model.pretrained:
        cfg.model.pretrained = _beside(path, cfg.model.pretrained)
    return cfg


def _beside(config_path: Path, value: str) -> str:
    candidate = config_path.parent / value
    if not Path(value).is_absolute() and candidate.exists():
        return str(candidate)
    return value
