"""Retrieval benchmarks with one or more captions per image.

`celeba-caption` takes either caption layout of the CelebA caption sets:

    MM-CelebA-HQ:  DIR/CelebA-HQ-img/0.jpg ...   DIR/celeba-caption/0.txt ... (one caption per line,
                   ten per image in the release)
    CelebA-Dialog: DIR/image/0.jpg ...            DIR/captions_hq.json (or text/captions_hq.json):
                   {"0.jpg": {"overall_caption": "...", "attribute_wise_captions": {...}}, ...}; a
                   value may also be a caption or a list of captions. The attribute-wise captions
                   describe one attribute each (many images share them), so only the overall
                   caption (or the listed ones) take part.

The evaluated images are the test split when one is given: DIR/test.txt (one image name or stem a
line), or the AttnGAN-style DIR/test/filenames.pickle (a list of names, read by an unpickler that
refuses anything but plain lists and strings); otherwise every captioned image (said in notes).

`folder-retrieval`: DIR holds images (any depth) each with a same-stem `.txt` beside it, one caption
per non-empty line; images without a `.txt` are left out and counted in notes.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facedata.core.errors import UserError

__all__ = ["IMAGE_SUFFIXES", "RetrievalBenchmark", "read_caption_folder", "read_caption_set"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SET_LAYOUT = ("a CelebA caption set: CelebA-HQ-img/ + celeba-caption/NAME.txt (MM-CelebA-HQ), or image/ + "
                      "captions_hq.json (CelebA-Dialog); optional test.txt or test/filenames.pickle")
FOLDER_LAYOUT = "a folder of images, each with a same-stem .txt holding one caption per line"


@dataclass
class RetrievalBenchmark:
    name: str
    root: Path
    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # [M]: the index into images of each caption
    notes: list[str] = field(default_factory=list)

    def captions_per_image(self) -> np.ndarray:
        return np.bincount(self.caption_image, minlength=len(self.images))


def _caption_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


class _ListsOfStrings(pickle.Unpickler):
    """Reads a pickle that holds only lists, tuples and strings; any class or function is refused,
    so a hostile file cannot run code."""

    def find_class(self, module, name):
        raise UserError(f"a split pickle may hold only lists of names (it refers to {module}.{name})")


def _split_names(root: Path) -> tuple[set[str] | None, str | None]:
    """The test split's image names and stems, and where they came from (None: no split file)."""
    txt = root / "test.txt"
    if txt.is_file():
        names = _caption_lines(txt)
        return {n for name in names for n in (name, Path(name).stem)}, "test.txt"
    pkl = root / "test" / "filenames.pickle"
    if pkl.is_file():
        try:
            names = _ListsOfStrings(io.BytesIO(pkl.read_bytes()), encoding="latin1").load()
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a truncated or foreign pickle
            raise UserError(f"{pkl}: cannot read the test split ({err})") from None
        if not isinstance(names, list | tuple) or not all(isinstance(n, str | bytes) for n in names):
            raise UserError(f"{pkl}: expected a list of image names")
        names = [n.decode() if isinstance(n, bytes) else n for n in names]
        return {x for name in names for x in (name, Path(name).stem, Path(name).name)}, "test/filenames.pickle"
    return None, None


def _image_index(folder: Path) -> dict[str, Path]:
    """stem and name -> image path, for the images directly in folder."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            out.setdefault(p.stem, p)
            out[p.name] = p
    return out


def _json_captions(value) -> list[str]:
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, list):
        return [v.strip() for v in value if isinstance(v, str) and v.strip()]
    if isinstance(value, dict):
        for key in ("overall_caption", "captions", "caption"):
            if key in value:
                return _json_captions(value[key])
    return []


def read_caption_set(root: Path) -> RetrievalBenchmark:
    image_dir = next((root / d for d in ("CelebA-HQ-img", "image", "images", "img") if (root / d).is_dir()), None)
    caption_dir = next((root / d for d in ("celeba-caption", "text") if (root / d).is_dir()
                        and any((root / d).glob("*.txt"))), None)
    caption_json = next((root / f for f in ("captions_hq.json", "text/captions_hq.json", "captions.json",
                                            "text/captions.json") if (root / f).is_file()), None)
    if image_dir is None:
        raise UserError(f"--data {root}: no CelebA-HQ-img/ or image/ folder (the images); expected {CAPTION_SET_LAYOUT}")
    if caption_dir is None and caption_json is None:
        raise UserError(f"--data {root}: no celeba-caption/ folder of .txt files nor captions_hq.json (the captions); "
                        f"expected {CAPTION_SET_LAYOUT}")
    by_name = _image_index(image_dir)
    per_image: dict[str, list[str]] = {}
    if caption_dir is not None:
        for txt in sorted(caption_dir.glob("*.txt"), key=lambda p: (len(p.stem), p.stem)):
            per_image[txt.stem] = _caption_lines(txt)
        source = f"{caption_dir.name}/"
    else:
        try:
            data = json.loads(caption_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{caption_json}: not readable JSON ({' '.join(str(err).split())[:120]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{caption_json}: expected an object of image name -> captions")
        per_image = {name: _json_captions(v) for name, v in data.items()}
        source = caption_json.name
    wanted, split_from = _split_names(root)
    notes = []
    if wanted is not None:
        per_image = {n: c for n, c in per_image.items() if n in wanted or Path(n).stem in wanted}
        notes.append(f"test split from {split_from}")
    else:
        notes.append("no test.txt or test/filenames.pickle: every captioned image is evaluated")
    images, captions, owner = [], [], []
    missing, empty = [], 0
    for name, caps in per_image.items():
        path = by_name.get(name) or by_name.get(Path(name).stem)
        if path is None:
            missing.append(name)
            continue
        if not caps:
            empty += 1
            continue
        captions.extend(caps)
        owner.extend([len(images)] * len(caps))
        images.append(path)
    if missing:
        raise UserError(f"{image_dir}: {len(missing)} captioned images are missing (first: {missing[0]}); "
                        f"expected {CAPTION_SET_LAYOUT}")
    if empty:
        notes.append(f"{empty} images without captions left out")
    if not images:
        raise UserError(f"--data {root}: no image has a caption in {source}")
    return RetrievalBenchmark("celeba-caption", root, images, captions, np.array(owner, dtype=np.int64), notes)


def read_caption_folder(root: Path) -> RetrievalBenchmark:
    images, captions, owner = [], [], []
    without = 0
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt = path.with_suffix(".txt")
        caps = _caption_lines(txt) if txt.is_file() else []
        if not caps:
            without += 1
            continue
        captions.extend(caps)
        owner.extend([len(images)] * len(caps))
        images.append(path)
    if not images:
        raise UserError(f"--data {root}: no image with a same-stem .txt caption file; expected {FOLDER_LAYOUT}")
    notes = [f"{without} images without a caption file left out"] if without else []
    return RetrievalBenchmark("folder-retrieval", root, images, captions, np.array(owner, dtype=np.int64), notes)
