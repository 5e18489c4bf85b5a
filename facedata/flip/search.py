"""Text-to-image search over a published dataset with a trained FLIP model, and an image-text
relevance score (CLIP score) for filtering.

`facedata search "a smiling woman with glasses" --dataset DEST --checkpoint CKPT [--k 16] [--out DIR]`

The dataset's images (all splits, or `--split`) are embedded once with the checkpoint's image
tower, read as its training read them (whole images or the primary face crop), and kept as a
faiss `IndexFlatIP` over the L2-normalised embeddings (exact cosine search; on a GPU with
faiss-gpu installed the search runs there). The index lives in

    DEST/search/<checkpoint sha256[:12]>/<all | split name>/
        index.faiss     the embeddings, row i = keys.parquet row i
        keys.parquet    key, split, face_caption, url, tar, img_ofs, img_len (the image's bytes in the tar)
        meta.json       written last: checkpoint hash, dataset fingerprint (manifest fingerprint and every
                        tar's name, size and mtime), image mode, counts, build time

(`--index-dir` puts `search/` elsewhere, e.g. when DEST is read-only). Each file is written to a
temporary name and renamed. A later search reuses the index while meta.json matches; a changed
checkpoint gets its own folder, a republished or changed dataset rebuilds the folder in place,
and `--rebuild` forces a rebuild. Old checkpoints' folders are left for you to delete.

Each search prints its result as JSON (query, checkpoint, index, results: rank, key, split, score
(cosine), face_caption, url) and writes it as `results.json` with a contact sheet
`contact_sheet.png` (each image captioned "0.31 · caption") into `--out` (default:
the index folder's `queries/<query-slug>/`).

Relevance filter
----------------
`clip_scores(model, images, captions)` is the cosine between each image and its own caption, as
DataComp's "CLIP score" filter (there with OpenAI's ViT-L/14, keeping pairs >= 0.28, or the top
30 %); `relevance_filter(scores, threshold)` turns scores into a keep mask. To use it in the
curation flow (not wired in yet): after the caption stage composed `face_caption` for a shard,

    ckpt = load_checkpoint(cfg.relevance.checkpoint)           # once per worker, not per shard
    # rows: the shard's caption records; image_bytes: its kept images from RUN/shards/NNNNN.tar
    # (read as the caption step reads them, with shards.tar_images)
    ok = [i for i, r in enumerate(rows) if r["status"] == records.OK and r["face_caption"]]
    scores = clip_scores(ckpt, [image_bytes[i] for i in ok], [rows[i]["face_caption"] for i in ok],
                         boxes=[rows[i]["faces"][rows[i]["primary_face"]]["bbox"] for i in ok]
                         if ckpt.use_crops else None)
    keep = relevance_filter(scores, cfg.relevance.threshold)
    # a new `clip_score` float32 column for those rows (null elsewhere), and for rows not kept
    # status = records.LOW_RELEVANCE ("low_relevance", a new caption-problem status)

Scores depend on the model: pick the threshold from the score distribution of a known-good
sample (e.g. its 5th-10th percentile), or use `keep_fraction` for a rank-based cut. A checkpoint
trained on the same captions scores them higher than a general CLIP would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facedata.core.errors import UserError

log = logging.getLogger("facedata.flip")

__all__ = ["SearchIndex", "add_search_parser", "clip_scores", "dataset_fingerprint", "dataset_splits",
           "load_or_build_index", "relevance_filter", "run_search", "run_search_command", "search_index"]

INDEX_FORMAT = "facedata-search-index-v1"
SPLIT_ORDER = ("train", "validation", "test")
_TAR = re.compile(r"^(?P<split>.+)-\d{5}\.tar$")


# --------------------------------------------------------------------------------------------- dataset

def _webdataset(data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise UserError(f"--dataset: {data_dir}: no such folder (a dataset written by facedata publish)")
    wds = data_dir / "webdataset"
    if not wds.is_dir():
        raise UserError(f"--dataset: {data_dir}: no webdataset/ folder in it (is it a published facedata dataset?)")
    return wds


def dataset_splits(data_dir: str | Path) -> list[str]:
    """The splits with tars in DEST/webdataset, train/validation/test first."""
    wds = _webdataset(Path(data_dir))
    found = {m.group("split") for p in wds.glob("*-*.tar") if (m := _TAR.match(p.name))}
    if not found:
        raise UserError(f"--dataset: {wds}: holds no SPLIT-NNNNN.tar shards")
    return [s for s in SPLIT_ORDER if s in found] + sorted(found - set(SPLIT_ORDER))


def dataset_fingerprint(data_dir: str | Path, splits: Sequence[str]) -> dict[str, Any]:
    """What the index depends on in the dataset: the manifest's fingerprint (when there is one)
    and each used tar's name, size and mtime."""
    data_dir = Path(data_dir)
    manifest = None
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        pass
    tars = []
    for split in splits:
        for p in sorted((data_dir / "webdataset").glob(f"{split}-*.tar")):
            if _TAR.match(p.name) and _TAR.match(p.name).group("split") == split:
                st = p.stat()
                tars.append([p.name, st.st_size, st.st_mtime_ns])
    return {"manifest_fingerprint": manifest, "tars": tars}


# --------------------------------------------------------------------------------------------- index

@dataclass
class SearchIndex:
    index: Any  # faiss index (on the GPU when faiss-gpu and a GPU are there)
    keys: Any  # pandas DataFrame, row i = index row i
    meta: dict[str, Any]
    folder: Path
    built: bool  # built by this call (False: loaded from the cache)
    data_dir: Path

    def __len__(self) -> int:
        return len(self.keys)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("search needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def _to_gpu(index):
    """The index on GPU 0 when faiss-gpu sees one, else as it is."""
    faiss = _faiss()
    try:
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            res = faiss.StandardGpuResources()
            gpu = faiss.index_cpu_to_gpu(res, 0, index)
            gpu.referenced_resources = res  # keep the resources alive with the index
            return gpu
    except Exception as err:  # noqa: BLE001 - a faiss-gpu that cannot use this GPU: search on the CPU
        log.warning("faiss-gpu unusable (%s); searching on the CPU", " ".join(str(err).split())[:200])
    return index


def index_folder(data_dir: str | Path, checkpoint_sha256: str, splits: Sequence[str] | None,
                 index_dir: str | Path | None = None) -> Path:
    root = Path(index_dir) if index_dir else Path(data_dir) / "search"
    scope = "all" if not splits else "+".join(splits)
    return root / checkpoint_sha256[:12] / scope


def _identity(ckpt, data_dir: Path, splits: list[str]) -> dict[str, Any]:
    """What must match for a cached index to be reused."""
    return {"format": INDEX_FORMAT, "checkpoint_sha256": ckpt.sha256, "splits": splits,
            "use_crops": bool(ckpt.use_crops), "crop_scale": float(ckpt.crop_scale),
            "dataset": dataset_fingerprint(data_dir, splits)}


def _load_cached(folder: Path, identity: dict[str, Any]):
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("identity") != identity:
        return None
    try:
        import pandas as pd

        index = _faiss().read_index(str(folder / "index.faiss"))
        keys = pd.read_parquet(folder / "keys.parquet")
    except Exception:  # noqa: BLE001 - missing or unreadable (faiss raises RuntimeError, arrow others): rebuild
        return None
    if index.ntotal != len(keys):
        return None
    return index, keys, meta


def load_or_build_index(ckpt, data_dir: str | Path, splits: Sequence[str] | None = None, *,
                        index_dir: str | Path | None = None, rebuild: bool = False, batch_size: int = 64,
                        workers: int = 0, progress: bool = False) -> SearchIndex:
    """The search index of the dataset's images (all splits, or `splits`) under `ckpt` (a
    facedata.flip.embed.FlipCheckpoint): loaded from its folder when still current, else built
    and saved there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from facedata.flip.embed import embed_split
    from facedata.core.shards import atomic_path, write_json

    data_dir = Path(data_dir)
    available = dataset_splits(data_dir)
    chosen = list(splits) if splits else available
    for split in chosen:
        if split not in available:
            raise UserError(f"--split: {data_dir / 'webdataset'}: no {split}-*.tar shards "
                            f"(splits there: {', '.join(available)})")
    folder = index_folder(data_dir, ckpt.sha256, splits, index_dir)
    identity = _identity(ckpt, data_dir, chosen)
    cached = None if rebuild else _load_cached(folder, identity)
    if cached is not None:
        index, keys, meta = cached
        return SearchIndex(_to_gpu(index), keys, meta, folder, False, data_dir)

    faiss = _faiss()
    t0 = time.perf_counter()
    parts, columns = [], {c: [] for c in ("key", "split", "face_caption", "url", "tar", "img_ofs", "img_len")}
    for split in chosen:
        emb = embed_split(ckpt, data_dir, split, batch_size=batch_size, workers=workers,
                          meta_fields=("url",), progress=progress)
        idx = emb.index
        parts.append(emb.embeddings)
        columns["key"] += emb.keys
        columns["split"] += [split] * len(emb.keys)
        columns["face_caption"] += emb.captions  # KEY.txt: the face caption
        columns["url"] += emb.meta["url"]
        columns["tar"] += [idx.tars[t].name for t in idx.tar_id]
        columns["img_ofs"] += idx.img_ofs.tolist()
        columns["img_len"] += idx.img_len.tolist()
    vectors = np.ascontiguousarray(np.concatenate(parts).astype(np.float32))
    faiss.normalize_L2(vectors)  # already unit length; exact again after the float32 round trip
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    build_s = time.perf_counter() - t0
    table = pa.table({"key": pa.array(columns["key"], pa.string()), "split": pa.array(columns["split"], pa.string()),
                      "face_caption": pa.array(columns["face_caption"], pa.string()),
                      "url": pa.array([u if isinstance(u, str) else None for u in columns["url"]], pa.string()),
                      "tar": pa.array(columns["tar"], pa.string()),
                      "img_ofs": pa.array(columns["img_ofs"], pa.int64()),
                      "img_len": pa.array(columns["img_len"], pa.int64())})
    meta = {"identity": identity, "n": index.ntotal, "dim": int(vectors.shape[1]),
            "checkpoint": str(ckpt.path), "checkpoint_step": ckpt.step, "dataset": str(data_dir.resolve()),
            "metric": "inner product of L2-normalised embeddings (cosine)", "build_s": round(build_s, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)  # the folder is not current until meta.json is back
        with atomic_path(folder / "index.faiss") as tmp:
            faiss.write_index(index, str(tmp))
        with atomic_path(folder / "keys.parquet") as tmp:
            pq.write_table(table, tmp)
        write_json(folder / "meta.json", meta)
    except OSError as err:
        raise UserError(f"cannot write the search index to {folder} ({err.strerror or err}); "
                        "choose a writable --index-dir") from None
    log.info("search index: %d images embedded in %.1f s -> %s", index.ntotal, build_s, folder)
    return SearchIndex(_to_gpu(index), table.to_pandas(), meta, folder, True, data_dir)


def _top(si: SearchIndex, ckpt, query: str, k: int) -> list[tuple[int, float]]:
    """(index row, cosine) of the top k images, best first."""
    from facedata.flip.embed import embed_texts

    query = (query or "").strip()
    if not query:
        raise UserError('query: empty; give words to search for, e.g. "a smiling woman with glasses"')
    if k < 1:
        raise UserError(f"--k: expected a positive number of results (got {k})")
    vector = np.ascontiguousarray(embed_texts(ckpt, [query]), dtype=np.float32)
    scores, ids = si.index.search(vector, min(k, len(si)))
    return [(i, float(score)) for score, i in zip(scores[0].tolist(), ids[0].tolist()) if i >= 0]


def _result(si: SearchIndex, rank: int, row_id: int, score: float) -> dict[str, Any]:
    row = si.keys.iloc[row_id]
    return {"rank": rank, "key": row["key"], "split": row["split"], "score": round(score, 4),
            "face_caption": row["face_caption"], "url": row["url"] if isinstance(row["url"], str) else None}


def search_index(si: SearchIndex, ckpt, query: str, k: int = 16) -> list[dict[str, Any]]:
    """The top k images for the query: rank, key, split, score (cosine), face_caption, url."""
    return [_result(si, rank, i, score) for rank, (i, score) in enumerate(_top(si, ckpt, query, k), 1)]


def _image_bytes(si: SearchIndex, row_id: int) -> bytes | None:
    from facedata.flip.embed import read_image_bytes

    row = si.keys.iloc[row_id]
    try:
        return read_image_bytes(si.data_dir / "webdataset" / row["tar"], int(row["img_ofs"]), int(row["img_len"]))
    except (OSError, UserError) as err:
        log.warning("search: cannot read the image of %s (%s)", row["key"], err)
        return None


def _slug(query: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", query.lower()).strip("-")[:48].strip("-") or "query"
    return f"{words}-{hashlib.sha1(query.encode()).hexdigest()[:8]}"


def run_search(query: str, dataset: str | Path, checkpoint: str | Path, *, k: int = 16,
               split: str | None = None, out: str | Path | None = None, index_dir: str | Path | None = None,
               device: str = "auto", batch_size: int = 64, workers: int = 0, rebuild: bool = False,
               progress: bool = False) -> dict[str, Any]:
    """The whole `facedata search`: index (cached), top-k, results.json and contact_sheet.png.
    Returns the result object (also written as results.json)."""
    from facedata.report.contact_sheet import make_contact_sheet
    from facedata.core.shards import write_json

    query = (query or "").strip()
    if not query:
        raise UserError('query: empty; give words to search for, e.g. "a smiling woman with glasses"')
    if k < 1:
        raise UserError(f"--k: expected a positive number of results (got {k})")
    available = dataset_splits(dataset)  # a missing or empty dataset fails here, before the model loads
    if split is not None and split not in available:
        raise UserError(f"--split: {Path(dataset) / 'webdataset'}: no {split}-*.tar shards "
                        f"(splits there: {', '.join(available)})")

    from facedata.flip.embed import load_checkpoint

    ckpt = load_checkpoint(checkpoint, device)
    si = load_or_build_index(ckpt, dataset, [split] if split else None, index_dir=index_dir, rebuild=rebuild,
                             batch_size=batch_size, workers=workers, progress=progress)
    t0 = time.perf_counter()
    top = _top(si, ckpt, query, k)
    search_s = time.perf_counter() - t0
    results = [_result(si, rank, i, score) for rank, (i, score) in enumerate(top, 1)]
    out_dir = Path(out) if out else si.folder / "queries" / _slug(query)
    result = {
        "query": query, "k": k, "checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.sha256,
        "checkpoint_step": ckpt.step, "dataset": str(Path(dataset)), "splits": si.meta["identity"]["splits"],
        "index": {"folder": str(si.folder), "built": si.built, "n": len(si), "build_s": si.meta.get("build_s")},
        "search_s": round(search_s, 4), "results": results,
        "results_json": str(out_dir / "results.json"), "contact_sheet": None,
    }
    items = [(data, f"{r['score']:.2f} · {r['face_caption'] or ''}") for r, (i, _) in zip(results, top)
             if (data := _image_bytes(si, i)) is not None]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        sheet = make_contact_sheet(items, out_dir / "contact_sheet.png", title=f'"{query}": top {len(results)}',
                                   max_items=max(1, len(items)), columns=min(8, max(1, len(items))))
        result["contact_sheet"] = str(sheet) if sheet else None
        write_json(out_dir / "results.json", result)
    except OSError as err:
        raise UserError(f"--out: cannot write to {out_dir} ({err.strerror or err})") from None
    return result


# --------------------------------------------------------------------------------------------- CLI

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number (got {text!r})")
    return value


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search", help="Search a published dataset's images by text with a trained FLIP model.",
        description="Search the images of a published dataset (facedata publish) by text with a FLIP checkpoint "
                    "(facedata train). The image index is built on first use and cached under DATASET/search/.")
    p.add_argument("query", help='what to look for, e.g. "a smiling woman with glasses"')
    p.add_argument("--dataset", required=True, type=Path, metavar="DIR", help="a published dataset folder")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                   help="a FLIP checkpoint (.pt), or a training run folder for its newest")
    p.add_argument("-k", "--k", type=_positive_int, default=16, help="number of results (default: 16)")
    p.add_argument("--split", help="search one split only (default: all)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where results.json and contact_sheet.png go (default: INDEX/queries/<query>/)")
    p.add_argument("--index-dir", type=Path, metavar="DIR", help="keep the index under DIR instead of DATASET/search")
    p.add_argument("--rebuild", action="store_true", help="rebuild the index even when it is current")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per embedding batch (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="image loading processes while indexing (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def run_search_command(args) -> int:
    result = run_search(args.query, args.dataset, args.checkpoint, k=args.k, split=args.split, out=args.out,
                        index_dir=args.index_dir, device=args.device, batch_size=args.batch_size,
                        workers=max(0, args.workers), rebuild=args.rebuild, progress=not args.no_progress)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    where = "built" if result["index"]["built"] else "reused"
    print(f"index {where}: {result['index']['folder']} ({result['index']['n']} images); "
          f"results: {result['results_json']}; contact sheet: {result['contact_sheet']}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------- relevance

def clip_scores(model, images: Sequence, captions: Sequence[str], *, boxes: Sequence | None = None,
                batch_size: int = 64) -> np.ndarray:
    """Cosine similarity between each image and its own caption ([N] float32, in [-1, 1]): the
    CLIP score of DataComp's filter. `model`: a FlipCheckpoint or FlipModel (anything with
    model, tokenizer, eval_transform); `images`: PIL images or encoded image bytes. `boxes`: the
    primary face box [x1, y1, x2, y2] (image pixels) per image, or None for whole images; give
    them for a checkpoint trained on face crops (`ckpt.use_crops`), which scores whole images
    poorly."""
    from facedata.flip.embed import embed_images, embed_texts

    if len(images) != len(captions):
        raise ValueError(f"clip_scores: {len(images)} images but {len(captions)} captions")
    if not len(images):
        return np.zeros(0, np.float32)
    image_emb = embed_images(model, images, batch_size=batch_size, boxes=boxes)
    text_emb = embed_texts(model, [c or "" for c in captions], batch_size=max(batch_size, 256))
    return np.einsum("nd,nd->n", image_emb, text_emb).astype(np.float32)


def relevance_filter(scores: Sequence[float] | np.ndarray, threshold: float | None = None, *,
                     keep_fraction: float | None = None) -> np.ndarray:
    """Keep mask ([N] bool) for CLIP scores: score >= threshold, and/or among the top
    `keep_fraction` of scores (DataComp's two variants; both given: both must hold). NaN scores
    are never kept."""
    scores = np.asarray(scores, dtype=np.float64)
    if threshold is None and keep_fraction is None:
        raise ValueError("relevance_filter: give a threshold, a keep_fraction or both")
    keep = np.isfinite(scores)
    if threshold is not None:
        keep &= scores >= threshold
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"relevance_filter: keep_fraction must be in (0, 1] (got {keep_fraction})")
        finite = scores[np.isfinite(scores)]
        if finite.size:
            n_keep = max(1, round(keep_fraction * finite.size))
            cut = np.sort(finite)[::-1][n_keep - 1]
            keep &= scores >= cut
    return keep
