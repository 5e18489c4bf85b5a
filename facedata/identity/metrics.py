"""Clustering quality against known identity labels: pairwise and BCubed precision/recall/F.

Everything comes from the contingency counts n_ij (faces with true label i and predicted label j),
so 1M faces cost one sort, never a list of pairs.

- pairwise: over all pairs of faces, precision = pairs put together that belong together / pairs
  put together; recall = pairs put together that belong together / pairs that belong together.
  With no predicted pairs precision is 1 (nothing wrongly joined); with no true pairs recall is 1.
- BCubed (Bagga & Baldwin 1998): per face, precision = share of its cluster with its label,
  recall = share of its label in its cluster; averaged over faces.
"""

from __future__ import annotations

import numpy as np


def _contingency(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_ij for each non-empty cell, true label of the cell, predicted label of the cell);
    labels may be any values numpy can sort (ints, strings)."""
    labels_true, labels_pred = np.asarray(labels_true), np.asarray(labels_pred)
    if labels_true.shape != labels_pred.shape or labels_true.ndim != 1:
        raise ValueError(f"label arrays must be 1-D and equally long, got {labels_true.shape} and {labels_pred.shape}")
    _, t = np.unique(labels_true, return_inverse=True)
    _, p = np.unique(labels_pred, return_inverse=True)
    width = int(p.max(initial=0)) + 1
    cells, counts = np.unique(t.astype(np.int64) * width + p, return_counts=True)
    true_of_cell, pred_of_cell = np.divmod(cells, width)
    return counts, true_of_cell, pred_of_cell


def _pairs(counts: np.ndarray) -> int:
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def _f(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def pairwise_prf(labels_true, labels_pred) -> tuple[float, float, float]:
    """Pairwise (precision, recall, F)."""
    n_ij, t, p = _contingency(labels_true, labels_pred)
    together = _pairs(n_ij)
    predicted = _pairs(np.bincount(p, weights=n_ij).astype(np.int64)) if len(n_ij) else 0
    actual = _pairs(np.bincount(t, weights=n_ij).astype(np.int64)) if len(n_ij) else 0
    precision = together / predicted if predicted else 1.0
    recall = together / actual if actual else 1.0
    return precision, recall, _f(precision, recall)


def bcubed_prf(labels_true, labels_pred) -> tuple[float, float, float]:
    """BCubed (precision, recall, F); all 1.0 for empty input."""
    n_ij, t, p = _contingency(labels_true, labels_pred)
    n = n_ij.sum()
    if n == 0:
        return 1.0, 1.0, 1.0
    n_ij = n_ij.astype(np.float64)
    precision = float((n_ij**2 / np.bincount(p, weights=n_ij)[p]).sum() / n)
    recall = float((n_ij**2 / np.bincount(t, weights=n_ij)[t]).sum() / n)
    return precision, recall, _f(precision, recall)


def n_clusters(labels) -> int:
    return len(np.unique(np.asarray(labels)))


def clustering_metrics(labels_true, labels_pred) -> dict[str, float | int]:
    """All of the above in one dict (n_identities: distinct true labels)."""
    pp, pr, pf = pairwise_prf(labels_true, labels_pred)
    bp, br, bf = bcubed_prf(labels_true, labels_pred)
    return {
        "pairwise_precision": pp,
        "pairwise_recall": pr,
        "pairwise_f": pf,
        "bcubed_precision": bp,
        "bcubed_recall": br,
        "bcubed_f": bf,
        "n_clusters": n_clusters(labels_pred),
        "n_identities": n_clusters(labels_true),
    }
