"""Readers for public face benchmarks in their own published file layouts (no model is loaded here).

- `celeba-attr`: CelebA's aligned images, `list_attr_celeba.txt`, `list_eval_partition.txt`.
- `lfwa-attr`: LFWA's images, its 40-attribute file and split, in CelebA's format (see lfwa.py).
- `celeba-caption`: caption sets with several captions per image (MM-CelebA-HQ's `celeba-caption/`
  folder of TXT files, CelebA-Dialog's `captions_hq.json`).
- `folder-retrieval`: any folder of images with a same-stem `.txt` each, one caption per line.

`read_benchmark(name, data_dir)` returns an `AttributeBenchmark` or a `RetrievalBenchmark`; a
missing or malformed file is a one-line UserError naming the file and the layout expected.
"""

from __future__ import annotations

from pathlib import Path

from facedata.core.errors import UserError
from facedata.flip.benchmarks.attributes import AttributeBenchmark, read_celeba, read_lfwa
from facedata.flip.benchmarks.captions import RetrievalBenchmark, read_caption_set, read_caption_folder

__all__ = ["BENCHMARKS", "AttributeBenchmark", "RetrievalBenchmark", "read_benchmark"]

BENCHMARKS = {
    "celeba-attr": read_celeba,
    "lfwa-attr": read_lfwa,
    "celeba-caption": read_caption_set,
    "folder-retrieval": read_caption_folder,
}


def read_benchmark(name: str, data_dir: str | Path) -> AttributeBenchmark | RetrievalBenchmark:
    if name not in BENCHMARKS:
        raise UserError(f"--benchmark: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data: {data_dir}: no such folder")
    return BENCHMARKS[name](data_dir)
