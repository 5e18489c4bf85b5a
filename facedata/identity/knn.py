"""k-nearest-neighbour graph of face embeddings with faiss (cosine similarity).

The embeddings may be a memory-mapped array (float16 rows from the shards): they are read, turned
into float32 and L2-normalised `batch` rows at a time, so besides the index itself memory stays
bounded. The index holds a copy of every row: float32 in the flat and HNSW indexes, float16 in
IVF (N x D x 2 bytes: 1 GB for 1M 512-d faces).

Index choice (`index="auto"`):

- flat (exact inner product) up to `exact_max` rows (default 20k) on CPU. Brute force costs
  N^2 x D: on the 2-core machine 20k faces take seconds but 100k several minutes, so larger
  runs go to
- ivf: an inverted file with ~4 sqrt(N) lists trained by k-means on a seeded sample, `nprobe`
  lists searched per query (each query scans ~nprobe / (4 sqrt(N)) of the rows). Rows are stored
  as float16 (IndexIVFScalarQuantizer, QT_fp16): the embeddings arrive as float16, so this loses
  nothing (similarities within 1e-4), halves the index and scanned ~1.7x faster than float32
  lists. On identity-structured synthetic data at 100k, the neighbours that matter (cosine >= 0.4)
  were found with recall 0.9997 at nprobe 8 (1024 lists).
- hnsw is available on request; its build is slower than IVF training on 2 cores.

With a GPU build of faiss and a visible GPU (`use_gpu="auto"`), flat and IVF indexes run on the
GPU, and "auto" stays exact up to GPU_EXACT_MAX rows since brute force is cheap there. HNSW has no
GPU implementation and stays on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

IndexKind = Literal["auto", "flat", "ivf", "hnsw"]

EXACT_MAX = 20_000
GPU_EXACT_MAX = 10_000_000
# IVF: training sample per list and k-means iterations. faiss asks for >= 39 points per list and
# 25 iterations; for neighbour recall at nprobe 8 neither bought anything measurable, and
# training is a large share of the k-NN time at 1M faces.
IVF_TRAIN_PER_LIST = 20
IVF_TRAIN_ITER = 10
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64


@dataclass(frozen=True)
class KnnGraph:
    """Each row's k nearest other rows, most similar first. Rows with fewer than k neighbours
    (N <= k, or an approximate index that found fewer) are padded with index -1, similarity -inf."""

    indices: np.ndarray  # int32 [N, k]
    sims: np.ndarray  # float32 [N, k], cosine similarity

    @property
    def n(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def ivf_lists(n: int) -> int:
    """Number of IVF lists for n rows: the power of two nearest 4 sqrt(n), at least 16 (1M rows:
    4096 lists; more lists shorten every scan but make k-means training dearer)."""
    return max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows as contiguous float32, renormalised (float16 storage leaves norms ~1e-3 off)."""
    x = np.array(rows, dtype=np.float32, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _choose_index(n: int, index: IndexKind, exact_max: int, on_gpu: bool) -> str:
    if index != "auto":
        return index
    return "flat" if n <= (GPU_EXACT_MAX if on_gpu else exact_max) else "ivf"


def _make_index(kind: str, emb: np.ndarray, nprobe: int, batch: int, seed: int) -> faiss.Index:
    n, dim = emb.shape
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    if kind != "ivf":
        raise ValueError(f"unknown index kind {kind!r}: expected auto, flat, ivf or hnsw")
    nlist = min(ivf_lists(n), n)
    index = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.niter = IVF_TRAIN_ITER
    index.cp.seed = seed
    index.nprobe = min(nprobe, nlist)
    sample = np.sort(np.random.default_rng(seed).choice(n, min(n, nlist * IVF_TRAIN_PER_LIST), replace=False))
    train = np.concatenate([_unit_rows(emb[sample[s : s + batch]]) for s in range(0, len(sample), batch)])
    # Small runs have fewer than 39 points per list to train on: that costs a little recall,
    # which nprobe makes up, so faiss need not warn about it.
    index.cp.min_points_per_centroid = 1
    index.train(train)
    return index


def build_knn(
    emb: np.ndarray,
    k: int = 32,
    index: IndexKind = "auto",
    exact_max: int = EXACT_MAX,
    nprobe: int = 8,
    use_gpu: bool | Literal["auto"] = "auto",
    batch: int = 16_384,
    threads: int | None = None,
    seed: int = 0,
) -> KnnGraph:
    """The k-NN graph (self excluded) of the rows of `emb` (N x D, float16/float32, may be a
    np.memmap), by cosine similarity. `threads`: OpenMP threads for faiss (None: faiss' default,
    one per core). Deterministic for a given input, index kind, thread count and seed."""
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array, got shape {emb.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    n, dim = emb.shape
    if n < 2:
        return KnnGraph(np.full((n, k), -1, np.int32), np.full((n, k), -np.inf, np.float32))
    on_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
    if on_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but this faiss build has no GPU support or sees no GPU")
    kind = _choose_index(n, index, exact_max, on_gpu)
    previous_threads = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        cpu_index = _make_index(kind, emb, nprobe, batch, seed)
        if on_gpu and kind != "hnsw":
            resources = faiss.StandardGpuResources()
            search_index = faiss.index_cpu_to_gpu(resources, 0, cpu_index)
        else:
            search_index = cpu_index
        if kind == "hnsw":
            search_index.hnsw.efSearch = max(64, 2 * (k + 1))
        for start in range(0, n, batch):
            search_index.add(_unit_rows(emb[start : start + batch]))
        indices = np.empty((n, k), np.int32)
        sims = np.empty((n, k), np.float32)
        kk = min(k + 1, n)
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            found_sims, found = search_index.search(_unit_rows(emb[start:stop]), kk)
            indices[start:stop], sims[start:stop] = _drop_self(found, found_sims, np.arange(start, stop), k)
    finally:
        faiss.omp_set_num_threads(previous_threads)
    return KnnGraph(indices, sims)


def _drop_self(found: np.ndarray, found_sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its k+1 results (or the last result when an exact
    duplicate pushed it out), pad to k columns with -1 / -inf."""
    is_self = found == rows[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # A duplicate of a row can tie with it, so "self" may be found twice; keep one mark per row.
    is_self &= np.cumsum(is_self, axis=1) == 1
    width = found.shape[1] - 1
    keep = ~is_self
    out_idx = found[keep].reshape(-1, width).astype(np.int32)
    out_sims = found_sims[keep].reshape(-1, width).astype(np.float32)
    out_sims[out_idx < 0] = -np.inf
    if width < k:
        pad = k - width
        out_idx = np.pad(out_idx, ((0, 0), (0, pad)), constant_values=-1)
        out_sims = np.pad(out_sims, ((0, 0), (0, pad)), constant_values=-np.inf)
    return out_idx, out_sims
