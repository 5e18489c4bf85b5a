"""CelebA and LFWA attribute benchmarks, read from their published text files.

CelebA (as distributed by its authors, and as torchvision lays it out):

    DIR/img_align_celeba/000001.jpg ...      (or DIR/Img/img_align_celeba/)
    DIR/list_attr_celeba.txt                 (or DIR/Anno/)  line 1: the image count; line 2: the 40
                                             attribute names; then `000001.jpg -1  1 ...` (-1/1)
    DIR/list_eval_partition.txt              (or DIR/Eval/)  `000001.jpg 0`: 0 train, 1 validation, 2 test

LFWA (Liu et al. 2015: LFW images with CelebA's 40 attributes; it circulates in several shapes,
and this reader takes the attribute and split files in CelebA's own format):

    DIR/lfw/NAME/NAME_0001.jpg ...           (or lfw-deepfunneled/, lfw_funneled/, img/; paths as
                                             written in the attribute file, relative to that folder)
    DIR/list_attr_lfwa.txt                   (or list_attr_lfw.txt, in DIR or DIR/Anno/) CelebA's format
    DIR/list_eval_partition_lfwa.txt         (or DIR/Eval/) `NAME/NAME_0001.jpg 0|1|2`

LFWA's published split has train (6,263) and test (6,970) only: when the partition file has no
validation rows, a seeded tenth of the train images becomes the validation split (say so in notes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facedata.core.errors import UserError

__all__ = ["CELEBA_ATTRIBUTES", "AttributeBenchmark", "parse_attribute_file", "parse_partition_file",
           "read_celeba", "read_lfwa"]

# The 40 names in the order of list_attr_celeba.txt's header
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")

SPLIT_NAMES = ("train", "validation", "test")

CELEBA_LAYOUT = ("CelebA's layout: img_align_celeba/, list_attr_celeba.txt (count line, header line, "
                 "-1/1 rows), list_eval_partition.txt (name 0/1/2)")
LFWA_LAYOUT = ("the LFWA layout: lfw/ (images as named in the attribute file), list_attr_lfwa.txt in CelebA's "
               "format (count line, header line, -1/1 rows), list_eval_partition_lfwa.txt (name 0/1/2)")


@dataclass
class AttributeBenchmark:
    name: str  # "celeba-attr"
    root: Path
    images: list[Path]  # one per sample
    attributes: list[str]  # the header's names
    labels: np.ndarray  # [N, A] uint8, 1 where the attribute holds (the files' 1), 0 for -1
    split: np.ndarray  # [N] 0 train, 1 validation, 2 test
    notes: list[str] = field(default_factory=list)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLIT_NAMES.index(split))

    def counts(self) -> dict[str, int]:
        return {s: int((self.split == i).sum()) for i, s in enumerate(SPLIT_NAMES)}


def _find(root: Path, names: tuple[str, ...], subdirs: tuple[str, ...], layout: str, what: str,
          folder: bool = False) -> Path:
    for sub in subdirs:
        for name in names:
            p = root / sub / name
            if (p.is_dir() if folder else p.is_file()):
                return p
    where = ", ".join(f"{s}/" if s else "./" for s in subdirs)
    raise UserError(f"--data {root}: no {names[0]}{'/' if folder else ''} ({what}; looked in {where}); "
                    f"expected {layout}")


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    return text.splitlines()  # CRLF files too


def parse_attribute_file(path: Path, layout: str) -> tuple[list[str], list[str], np.ndarray]:
    """(image names, attribute names, [N, A] 0/1 labels) of a file in list_attr_celeba.txt's format.
    Values -1 and 0 read as absent, 1 as present; anything else is an error naming the line."""
    lines = _lines(path)
    if len(lines) < 2:
        raise UserError(f"{path}: expected a count line and a header line first; {layout}")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise UserError(f"{path}:1: expected the image count, got {lines[0][:60]!r}; {layout}") from None
    names = lines[1].split()
    if not names:
        raise UserError(f"{path}:2: expected the attribute names; {layout}")
    images, rows = [], []
    for no, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise UserError(f"{path}:{no}: {len(parts) - 1} values for {len(names)} attributes")
        try:
            values = [int(v) for v in parts[1:]]
        except ValueError:
            raise UserError(f"{path}:{no}: values must be -1, 0 or 1") from None
        if any(v not in (-1, 0, 1) for v in values):
            raise UserError(f"{path}:{no}: values must be -1, 0 or 1")
        images.append(parts[0])
        rows.append(values)
    if len(images) != count:
        raise UserError(f"{path}: the count line says {count} images but {len(images)} rows follow")
    labels = (np.array(rows, dtype=np.int8).reshape(len(rows), len(names)) == 1).astype(np.uint8)
    return images, names, labels


def parse_partition_file(path: Path) -> dict[str, int]:
    """name -> 0 (train), 1 (validation) or 2 (test), from list_eval_partition.txt's format."""
    out: dict[str, int] = {}
    for no, line in enumerate(_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise UserError(f"{path}:{no}: expected `IMAGE 0|1|2` (0 train, 1 validation, 2 test)")
        out[parts[0]] = int(parts[1])
    return out


def _assemble(name: str, root: Path, image_dir: Path, attr_file: Path, part_file: Path, layout: str,
              notes: list[str]) -> AttributeBenchmark:
    images, attributes, labels = parse_attribute_file(attr_file, layout)
    partition = parse_partition_file(part_file)
    missing_split = [i for i in images if i not in partition]
    if missing_split:
        raise UserError(f"{part_file}: {len(missing_split)} images of {attr_file.name} have no split "
                        f"(first: {missing_split[0]})")
    split = np.array([partition[i] for i in images], dtype=np.int8)
    paths = [image_dir / i for i in images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{image_dir}: {len(missing)} of {len(paths)} images listed in {attr_file.name} are missing "
                        f"(first: {missing[0].name}); expected {layout}")
    return AttributeBenchmark(name, root, paths, attributes, labels, split, notes)


def read_celeba(root: Path) -> AttributeBenchmark:
    attr = _find(root, ("list_attr_celeba.txt",), ("", "Anno", "anno"), CELEBA_LAYOUT, "the 40 attribute labels")
    part = _find(root, ("list_eval_partition.txt",), ("", "Eval", "eval", "Anno"), CELEBA_LAYOUT,
                 "the train/validation/test split")
    images = _find(root, ("img_align_celeba",), ("", "Img", "img", "img_align_celeba"), CELEBA_LAYOUT,
                   "the aligned images", folder=True)
    bench = _assemble("celeba-attr", root, images, attr, part, CELEBA_LAYOUT, [])
    if not (bench.split == 0).any() or not (bench.split == 2).any():
        raise UserError(f"{part}: needs train (0) and test (2) rows; has {bench.counts()}")
    return bench


def read_lfwa(root: Path, validation_share: float = 0.1, seed: int = 0) -> AttributeBenchmark:
    attr = _find(root, ("list_attr_lfwa.txt", "list_attr_lfw.txt"), ("", "Anno", "anno"), LFWA_LAYOUT,
                 "the 40 attribute labels")
    part = _find(root, ("list_eval_partition_lfwa.txt", "list_eval_partition_lfw.txt", "list_eval_partition.txt"),
                 ("", "Eval", "eval", "Anno"), LFWA_LAYOUT, "the train/test split")
    images = _find(root, ("lfw", "lfw-deepfunneled", "lfw_funneled", "img"), ("",), LFWA_LAYOUT,
                   "the images", folder=True)
    bench = _assemble("lfwa-attr", root, images, attr, part, LFWA_LAYOUT, [])
    if not (bench.split == 0).any() or not (bench.split == 2).any():
        raise UserError(f"{part}: needs train (0) and test (2) rows; has {bench.counts()}")
    if not (bench.split == 1).any():
        # LFWA publishes no validation split: hold out a seeded share of train to tune the probe on
        train = np.flatnonzero(bench.split == 0)
        n_val = max(1, round(validation_share * len(train))) if len(train) > 1 else 0
        chosen = np.random.default_rng(seed).choice(train, n_val, replace=False)
        bench.split[chosen] = 1
        bench.notes.append(f"no validation rows in {part.name}: {n_val} of {len(train)} train images "
                           f"(seed {seed}) hold out to tune the probe")
    return bench
