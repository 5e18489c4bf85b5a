"""Small benchmark fixtures in each benchmark's exact file layout, built from the project's real
photos (openpeople's 10 people x 4 shots, cropped around the face as CelebA's aligned images are).

The labels and captions are hand-made and kept in tests/data/benchmarks/ (list_attr_celeba.txt and
the LFWA files: 40 attributes judged by looking at the 40 crops; captions written by hand); only the
images are cut here, at test time, from the photos the openpeople package ships. Numbers measured
on these fixtures are fixture numbers, not benchmark results.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from PIL import Image

from tests.conftest import REPO, openpeople_photos

DATA = REPO / "tests" / "data" / "benchmarks"
SHOTS = ("studio_portrait", "amateur_selfie", "amateur_posture", "studio_posture")


def _face_centres() -> dict[str, tuple[float, float]]:
    with open(REPO / "tests" / "data" / "attribute_labels.csv", newline="") as f:
        return {r["image"]: (float(r["x"]), float(r["y"])) for r in csv.DictReader(f) if r["x"]}


def face_crop(photo: Path, size: tuple[int, int]) -> Image.Image:
    """The face of an openpeople photo, cut around its hand-marked centre with the aspect of `size`
    (CelebA's aligned 178x218, LFW's 250x250), resized to `size`."""
    key = f"openpeople/{photo.parent.parent.name}/{photo.name}"
    cx, cy = _face_centres()[key]
    with Image.open(photo) as im:
        im = im.convert("RGB")
        # posture shots show the whole upper body: the face is a small part of the frame
        side = 0.16 * max(im.size) if "posture" in photo.stem else 0.45 * min(im.size)
        w, h = side, side * size[1] / size[0]
        x, y = cx * im.width, cy * im.height
        return im.crop((round(x - w / 2), round(y - h / 2), round(x + w / 2), round(y + h / 2))).resize(size)


def _photo(person: int, shot: str) -> Path:
    photos = {(p.parent.parent.name, p.stem): p for p in openpeople_photos()}
    return photos[(f"P{person:03d}", shot)]


def build_celeba(dest: Path) -> Path:
    """dest/img_align_celeba/000001.jpg..000040.jpg (P001's four shots first), list_attr_celeba.txt,
    list_eval_partition.txt (identity-disjoint: 6 people train, 2 validation, 2 test)."""
    (dest / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    for person in range(1, 11):
        for s, shot in enumerate(SHOTS):
            face_crop(_photo(person, shot), (178, 218)).save(
                dest / "img_align_celeba" / f"{(person - 1) * 4 + s + 1:06d}.jpg", quality=90)
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt"):
        shutil.copy(DATA / "celeba" / name, dest / name)
    return dest


def build_lfwa(dest: Path) -> Path:
    """dest/lfw/Person_P001/Person_P001_0001.jpg ..., list_attr_lfwa.txt, list_eval_partition_lfwa.txt
    (train and test only, as LFWA publishes)."""
    for person in range(1, 11):
        folder = dest / "lfw" / f"Person_P{person:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for s, shot in enumerate(SHOTS):
            face_crop(_photo(person, shot), (250, 250)).save(folder / f"Person_P{person:03d}_{s + 1:04d}.jpg",
                                                            quality=90)
    for name in ("list_attr_lfwa.txt", "list_eval_partition_lfwa.txt"):
        shutil.copy(DATA / "lfwa" / name, dest / name)
    return dest


def build_mm_celeba_hq(dest: Path) -> Path:
    """dest/CelebA-HQ-img/0.jpg..9.jpg (the studio portraits), celeba-caption/N.txt (3 captions
    each), test.txt (images 0-7)."""
    (dest / "CelebA-HQ-img").mkdir(parents=True, exist_ok=True)
    for i in range(10):
        face_crop(_photo(i + 1, "studio_portrait"), (256, 256)).save(dest / "CelebA-HQ-img" / f"{i}.jpg", quality=90)
    shutil.copytree(DATA / "mm_celeba_hq" / "celeba-caption", dest / "celeba-caption")
    shutil.copy(DATA / "mm_celeba_hq" / "test.txt", dest / "test.txt")
    return dest


def build_celeba_dialog(dest: Path) -> Path:
    """dest/image/0.jpg..5.jpg (selfies of P001-P006) and captions_hq.json."""
    (dest / "image").mkdir(parents=True, exist_ok=True)
    for i in range(6):
        face_crop(_photo(i + 1, "amateur_selfie"), (256, 256)).save(dest / "image" / f"{i}.jpg", quality=90)
    shutil.copy(DATA / "celeba_dialog" / "captions_hq.json", dest / "captions_hq.json")
    return dest


def build_folder(dest: Path) -> Path:
    """dest/PNNN_amateur_posture.jpg for P001-P005 with the hand-written .txt beside four of them
    (P004 has none: it is left out)."""
    dest.mkdir(parents=True, exist_ok=True)
    for person in range(1, 6):
        name = f"P{person:03d}_amateur_posture"
        face_crop(_photo(person, "amateur_posture"), (224, 224)).save(dest / f"{name}.jpg", quality=90)
        if (DATA / "folder" / f"{name}.txt").is_file():
            shutil.copy(DATA / "folder" / f"{name}.txt", dest / f"{name}.txt")
    return dest
