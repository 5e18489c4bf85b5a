"""The models a benchmark table compares, each loaded the same way whatever its origin.

- `--checkpoint PATH`: a checkpoint written by `facedata train` (or its run folder), read with
  facedata.flip.embed.load_checkpoint; its random initialisation is the training seed's.
- `--model ARCH[=WEIGHTS]`: an open_clip architecture: a built-in name (ViT-B-16, ...), an open_clip
  model-config JSON, or a facedata training YAML (its `model:` section); `=WEIGHTS` loads a local
  checkpoint file through open_clip's loader (OpenAI/open_clip CLIP weights, a FaRL checkpoint with
  its CLIP state dict under `state_dict`, a facedata checkpoint). Without weights it is the
  architecture at random initialisation (seed 0).

Every encoder ends up as an open_clip model with its tokenizer and eval transform (a FlipModel), so
the benchmark protocols see no difference between them. `random_init_of` gives the same
architecture at the random initialisation it was (or would have been) trained from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facedata.core.errors import UserError

__all__ = ["Encoder", "ModelSpec", "check_spec", "load_encoder", "parse_model_spec", "random_init_of"]


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "checkpoint" (facedata train) or "open_clip"
    source: str  # the path or architecture as given
    weights: str | None = None  # open_clip: a local weights file


@dataclass
class Encoder:
    label: str  # the table's row name
    kind: str  # "facedata checkpoint" | "open_clip weights" | "random init"
    source: str  # where it came from, for the table
    flip: Any  # a FlipModel: .model (open_clip CLIP), .tokenizer, .eval_transform, .image_size
    section: Any  # the ModelSection that builds its architecture (random initialisation)
    seed: int  # the seed of that random initialisation


def parse_model_spec(text: str) -> ModelSpec:
    """ARCH or ARCH=WEIGHTS (the last '=' separates: a Windows drive letter stays in the path)."""
    arch, sep, weights = text.rpartition("=") if "=" in text else (text, "", "")
    if not arch.strip():
        raise UserError(f"--model {text!r}: expected ARCH or ARCH=WEIGHTS (ARCH an open_clip name or config file)")
    return ModelSpec("open_clip", arch.strip(), weights.strip() or None)


def _section_for(arch: str) -> Any:
    from facedata.flip.config import ModelSection, named_architectures

    path = Path(arch)
    try:
        if arch in named_architectures():
            return ModelSection(name=arch)
        if path.suffix.lower() == ".json" and path.is_file():
            return ModelSection(config=json.loads(path.read_text(encoding="utf-8")))
        if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
            from facedata.flip.config import load_train_config

            return load_train_config(path).model.model_copy(update={"pretrained": None})
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a ValidationError or unreadable JSON
        raise UserError(f"--model {arch}: not a usable open_clip model config ({' '.join(str(err).split())[:200]})") \
            from None
    raise UserError(f"--model {arch}: neither an open_clip architecture name nor a .json/.yaml config file")


def check_spec(spec: ModelSpec) -> None:
    """The files a spec names exist (checked before any model loads)."""
    if spec.kind == "checkpoint":
        if not Path(spec.source).exists():
            raise UserError(f"--checkpoint {spec.source}: no such file or folder")
        return
    _section_for(spec.source)
    if spec.weights is not None and not Path(spec.weights).is_file():
        raise UserError(f"--model {spec.source}={spec.weights}: no such weights file (a local checkpoint; "
                        "nothing is downloaded)")


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_encoder(spec: ModelSpec) -> Encoder:
    from facedata.flip.config import ModelSection
    from facedata.flip.model import build_flip_model

    if spec.kind == "checkpoint":
        from facedata.flip.embed import load_checkpoint

        ckpt = load_checkpoint(spec.source, device="cpu")
        section = ModelSection(config=ckpt.model_config, mean=(ckpt.config.get("model") or {}).get("mean"),
                               std=(ckpt.config.get("model") or {}).get("std"))
        seed = int((ckpt.config.get("training") or {}).get("seed", 0))
        run = ckpt.path.parent.parent.name if ckpt.path.parent.name == "checkpoints" else ckpt.path.parent.name
        label = f"facedata {run} step {ckpt.step}" if ckpt.step is not None else f"facedata {ckpt.path.name}"
        return Encoder(label, "facedata checkpoint", str(ckpt.path), ckpt, section, seed)
    section = _section_for(spec.source)
    arch = Path(spec.source).stem if Path(spec.source).suffix else spec.source
    if spec.weights is None:
        flip = _seeded(0, lambda: build_flip_model(section))
        return Encoder(f"{arch} random init", "random init", spec.source, flip, section, 0)
    flip = build_flip_model(section.model_copy(update={"pretrained": spec.weights}))
    return Encoder(f"{arch} {Path(spec.weights).name}", "open_clip weights", f"{spec.source}={spec.weights}",
                   flip, section, 0)


def random_init_of(encoder: Encoder) -> Encoder:
    """The encoder's architecture at the random initialisation its training started from (a
    facedata checkpoint: its training seed, as train() seeds it; otherwise seed 0)."""
    from facedata.flip.model import build_flip_model

    flip = _seeded(encoder.seed, lambda: build_flip_model(encoder.section))
    arch = encoder.section.name or f"{encoder.label.split(' step ')[0]} architecture"
    return Encoder(f"{arch} random init (seed {encoder.seed})", "random init", encoder.source, flip,
                   encoder.section, encoder.seed)
