"""Identity clustering on a k-NN graph of face embeddings, and per-face cluster statistics.

Both methods work on the same graph: an undirected edge joins two faces when either lists the
other among its k nearest neighbours with cosine similarity >= threshold (the threshold itself
counts as an edge).

- components: connected components of that graph. Fast and simple, but one chain of look-alike
  or blurry faces is enough to join two people.
- chinese_whispers (default): Chinese Whispers label propagation (Biemann 2006). Every face
  starts as its own cluster and repeatedly takes the label with the largest total edge weight
  among its neighbours. A face in a chain between two people has few edges, so it cannot pull
  either group across; each group keeps its own label. Edge weight is sim ** EDGE_POWER, so one
  strong edge (0.9 -> 0.66) outweighs several near the threshold (0.4 -> 0.03). With plain
  similarity weights two look-alike people (openpeople's P004 and P010, many pairs at 0.4-0.6)
  ended up in one cluster under 6 of 10 seeds at threshold 0.4; with the 4th power under none
  of 10, at threshold 0.35 or 0.4.
  Faces are updated in `CW_BATCHES` seeded random batches per round (close to the original
  one-face-at-a-time order, which lets labels settle, while each batch is one vectorised step).

Labels are renumbered 0.. by cluster size, largest first (ties: the cluster whose first face
comes first), so reruns on the same input give the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from facedata.core.config import IdentityConfig
from facedata.identity.knn import KnnGraph, build_knn

Method = Literal["components", "chinese_whispers"]

EDGE_POWER = 4
CW_BATCHES = 16


def similarity_graph(graph: KnnGraph, threshold: float) -> sparse.csr_matrix:
    """Symmetric sparse matrix of the k-NN edges with similarity >= threshold > 0 (weight:
    similarity; positive, so the sparse maximum that symmetrises it drops no edge)."""
    n, k = graph.indices.shape
    rows = np.repeat(np.arange(n, dtype=np.int32), k)
    cols = graph.indices.ravel()
    sims = graph.sims.ravel()
    keep = (cols >= 0) & (sims >= threshold) & (cols != rows)
    directed = sparse.csr_matrix((sims[keep], (rows[keep], cols[keep])), shape=(n, n), dtype=np.float32)
    return directed.maximum(directed.T).tocsr()


def cluster(
    graph: KnnGraph,
    method: Method = "chinese_whispers",
    threshold: float = 0.4,
    seed: int = 0,
    max_rounds: int = 30,
) -> np.ndarray:
    """Identity labels (int64 [N], 0 = largest cluster) for the faces of a k-NN graph.
    `threshold` must be in (0, 1]: identity edges need a positive similarity. Chinese Whispers
    stops when a round changes no label, or after `max_rounds`; `seed` fixes its update order."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    n = graph.n
    if n == 0:
        return np.empty(0, np.int64)
    adjacency = similarity_graph(graph, threshold)
    if method == "components":
        _, labels = connected_components(adjacency, directed=False)
    elif method == "chinese_whispers":
        labels = _chinese_whispers(adjacency, seed, max_rounds)
    else:
        raise ValueError(f"unknown clustering method {method!r}: expected components or chinese_whispers")
    return _renumber(labels)


def _chinese_whispers(adjacency: sparse.csr_matrix, seed: int, max_rounds: int) -> np.ndarray:
    n = adjacency.shape[0]
    indptr, neighbours = adjacency.indptr, adjacency.indices
    weights = adjacency.data**EDGE_POWER
    labels = np.arange(n, dtype=np.int64)
    active = np.flatnonzero(np.diff(indptr) > 0)  # faces without edges keep their own label
    if len(active) == 0:
        return labels
    rng = np.random.default_rng(seed)
    for _ in range(max_rounds):
        changed = 0
        for batch in np.array_split(rng.permutation(active), min(CW_BATCHES, len(active))):
            faces, best = _strongest_labels(batch, indptr, neighbours, weights, labels, n)
            changed += np.count_nonzero(labels[faces] != best)
            labels[faces] = best
        if changed == 0:
            break
    return labels


def _strongest_labels(
    batch: np.ndarray,
    indptr: np.ndarray,
    neighbours: np.ndarray,
    weights: np.ndarray,
    labels: np.ndarray,
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """For each face in `batch` (all with >= 1 edge), the neighbour label of largest total edge
    weight; ties go to the smallest label. Returns (faces in ascending order, their labels)."""
    batch = np.sort(batch)
    degree = indptr[batch + 1] - indptr[batch]
    ends = np.cumsum(degree)
    edge = np.arange(ends[-1]) + np.repeat(indptr[batch] - (ends - degree), degree)
    position = np.repeat(np.arange(len(batch), dtype=np.int64), degree)
    # One sort groups each face's edges by neighbour label: key = (face position, label).
    key = position * n + labels[neighbours[edge]]
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    totals = np.add.reduceat(weights[edge][order], starts)
    group_face, group_label = np.divmod(key[starts], n)
    face_starts = np.flatnonzero(np.r_[True, group_face[1:] != group_face[:-1]])
    best_total = np.maximum.reduceat(totals, face_starts)
    is_best = totals == np.repeat(best_total, np.diff(np.r_[face_starts, len(totals)]))
    best = np.flatnonzero(is_best)
    first = best[np.r_[True, group_face[best][1:] != group_face[best][:-1]]]
    return batch, group_label[first]


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Ids 0.. by cluster size descending, ties by first occurrence."""
    _, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[inverse.ravel()]


@dataclass(frozen=True)
class ClusterSummary:
    size: np.ndarray  # int64 [N]: faces in this face's cluster
    centre_sim: np.ndarray  # float32 [N]: cosine similarity to the L2-normalised cluster mean (1 alone)
    outlier: np.ndarray  # bool [N]: centre_sim < outlier_threshold in a cluster of >= min_size faces


def cluster_summary(
    emb: np.ndarray,
    labels: np.ndarray,
    outlier_threshold: float = 0.35,
    min_size: int = 3,
    batch: int = 65_536,
) -> ClusterSummary:
    """Per-face cluster size, similarity to the cluster centre and outlier flag. `labels` must be
    numbered as `cluster` numbers them (0.. by size, largest first); `emb` may be a memmap, read
    `batch` rows at a time. Only clusters of >= 2 faces hold a centre in memory."""
    n = len(labels)
    counts = np.bincount(labels, minlength=1) if n else np.zeros(0, np.int64)
    size = counts[labels] if n else np.zeros(0, np.int64)
    centre_sim = np.ones(n, np.float32)
    multi = int(np.count_nonzero(counts >= 2))  # clusters 0..multi-1, thanks to the size order
    if multi:
        centres = np.zeros((multi, emb.shape[1]), np.float32)
        for _, x, lab in _labelled_batches(emb, labels, multi, batch):
            order = np.argsort(lab, kind="stable")
            lab_sorted = lab[order]
            starts = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
            centres[lab_sorted[starts]] += np.add.reduceat(x[order], starts, axis=0)
        norms = np.linalg.norm(centres, axis=1, keepdims=True)
        np.divide(centres, norms, out=centres, where=norms > 0)
        for rows, x, lab in _labelled_batches(emb, labels, multi, batch):
            centre_sim[rows] = np.einsum("ij,ij->i", x, centres[lab])
    outlier = (size >= min_size) & (centre_sim < outlier_threshold)
    return ClusterSummary(size, centre_sim, outlier)


def _labelled_batches(emb: np.ndarray, labels: np.ndarray, multi: int, batch: int):
    """(row numbers, unit float32 embeddings, labels) of the faces in clusters below `multi`,
    batch by batch."""
    for start in range(0, len(labels), batch):
        lab = labels[start : start + batch]
        rows = np.flatnonzero(lab < multi)
        if len(rows):
            x = np.asarray(emb[start : start + len(lab)], dtype=np.float32)[rows]
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            yield start + rows, x, lab[rows]


def cluster_faces(emb: np.ndarray, cfg: IdentityConfig | None = None) -> tuple[np.ndarray, ClusterSummary]:
    """Embeddings (N x D, may be a memmap) -> identity labels and per-face summary, per `cfg`."""
    cfg = cfg or IdentityConfig()
    graph = build_knn(emb, k=cfg.k, index=cfg.index, exact_max=cfg.exact_max, nprobe=cfg.nprobe, seed=cfg.seed)
    labels = cluster(graph, cfg.method, cfg.threshold, seed=cfg.seed)
    return labels, cluster_summary(emb, labels, cfg.outlier_threshold)
