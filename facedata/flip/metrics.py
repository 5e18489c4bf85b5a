"""Evaluation metrics on plain embeddings and labels; they know nothing of models or datasets.

- `retrieval_recall`: image<->text recall@k for paired rows (one caption per image), ties counted
  as a random order of the tied candidates.
- `multi_caption_recall`: the same when an image has several captions (CelebA caption sets): a
  caption query finds its image; an image query is found when any of its captions ranks in the top k.
- `zero_shot_accuracy`: classification by the nearest (prompt-ensembled) class embedding.
- `linear_probe`: multinomial logistic regression on frozen features, L2 by cross-validation.
- `attribute_probe`: one binary logistic regression per attribute (CelebA/LFWA's 40), trained on a
  train split, its L2 chosen per attribute on a validation split, accuracy on a test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where used: importing the metrics stays light
    import torch

__all__ = ["DEFAULT_KS", "DEFAULT_L2", "TIE_TOL", "balanced_accuracy", "linear_probe", "retrieval_recall",
           "zero_shot_accuracy"]

DEFAULT_KS = (1, 5, 10)
TIE_TOL = 1e-6  # scores this close to the match's count as ties
DEFAULT_L2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _as_array(x, name: str, ndim: int | None = None) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    return arr


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _ranks(scores: np.ndarray, correct: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: candidates scoring above the correct one (g), and others tied with it (t)."""
    target = scores[np.arange(len(scores)), correct][:, None]
    above = (scores > target + tol).sum(axis=1)
    tied = (np.abs(scores - target) <= tol).sum(axis=1) - 1
    return above, tied


def _recall_at(above: np.ndarray, tied: np.ndarray, k: int) -> float:
    """Expected recall@k when tied candidates are ordered at random: the match's rank is uniform
    over above+1 .. above+tied+1."""
    return float(np.mean(np.clip((k - above) / (tied + 1), 0.0, 1.0)))


def retrieval_recall(image_emb, text_emb, ks: Sequence[int] = DEFAULT_KS, *, normalize: bool = True,
                     tie_tol: float = TIE_TOL, chunk: int = 4096) -> dict[str, Any]:
    """Recall@k of image->text and text->image retrieval for paired embeddings (row i of each is a
    pair). Scores are cosine similarities (dot products when normalize=False).

    Returns {"n", "image_to_text": {"R@k": ...}, "text_to_image": {...}, "mean_rank": {"image_to_text",
    "text_to_image"}}; mean_rank is 1-based, expected over random orders of ties."""
    img = _as_array(image_emb, "image_emb", 2).astype(np.float64)
    txt = _as_array(text_emb, "text_emb", 2).astype(np.float64)
    if img.shape != txt.shape:
        raise ValueError(f"image_emb {img.shape} and text_emb {txt.shape} must be paired row by row")
    if normalize:
        img, txt = _l2_normalise(img), _l2_normalise(txt)
    n = len(img)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return {**out, "image_to_text": {f"R@{k}": None for k in ks}, "text_to_image": {f"R@{k}": None for k in ks},
                "mean_rank": {"image_to_text": None, "text_to_image": None}}
    for name, queries, gallery in (("image_to_text", img, txt), ("text_to_image", txt, img)):
        above, tied = [], []
        for start in range(0, n, chunk):
            rows = np.arange(start, min(n, start + chunk))
            a, t = _ranks(queries[rows] @ gallery.T, rows, tie_tol)
            above.append(a)
            tied.append(t)
        a, t = np.concatenate(above), np.concatenate(tied)
        out[name] = {f"R@{k}": _recall_at(a, t, k) for k in ks}
        out.setdefault("mean_rank", {})[name] = float(np.mean(a + 1 + t / 2))
    return out


def balanced_accuracy(correct: np.ndarray, labels: np.ndarray) -> float:
    """The mean over the classes present in `labels` of the (expected) share of that class's
    samples classified correctly; `correct` may hold fractions (credit shared among ties)."""
    classes = np.unique(labels)
    return float(np.mean([correct[labels == c].mean() for c in classes]))


def _tie_credit(scores: np.ndarray, labels: np.ndarray, tol: float) -> np.ndarray:
    """Per row, the expected correctness of argmax when the best-scoring classes are ordered at random."""
    best = scores.max(axis=1, keepdims=True)
    top = scores >= best - tol
    hit = np.zeros(len(scores))
    known = (labels >= 0) & (labels < scores.shape[1])
    rows = np.flatnonzero(known)
    hit[rows] = top[rows, labels[rows]] / top[rows].sum(axis=1)
    return hit


def zero_shot_accuracy(image_emb, class_emb, labels, *, normalize: bool = True,
                       tie_tol: float = TIE_TOL) -> dict[str, Any]:
    """Zero-shot classification: each image takes the class whose embedding is most similar.

    class_emb: [C, D] class embeddings, or [C, P, D] for P prompts per class, which are normalised,
    averaged and renormalised (CLIP's prompt ensembling). labels: [N] class indices into class_emb;
    -1 marks an unknown label (left out). Ties among the best classes share the credit.

    Returns {"n", "accuracy", "balanced_accuracy", "per_class_recall" {class index: recall},
    "predictions" [N] (argmax, -1 where left out)}."""
    img = _as_array(image_emb, "image_emb", 2).astype(np.float64)
    cls = _as_array(class_emb, "class_emb").astype(np.float64)
    labels = _as_array(labels, "labels", 1).astype(np.int64)
    if cls.ndim == 3:
        cls = _l2_normalise(cls).mean(axis=1)
    if cls.ndim != 2:
        raise ValueError(f"class_emb: expected [C, D] or [C, P, D], got shape {cls.shape}")
    if len(img) != len(labels):
        raise ValueError(f"{len(img)} images but {len(labels)} labels")
    if normalize:
        img, cls = _l2_normalise(img), _l2_normalise(cls)
    keep = labels >= 0
    scores = img[keep] @ cls.T
    y = labels[keep]
    predictions = np.full(len(labels), -1)
    if not keep.any():
        return {"n": 0, "accuracy": None, "balanced_accuracy": None, "per_class_recall": {},
                "predictions": predictions.tolist()}
    credit = _tie_credit(scores, y, tie_tol)
    predictions[keep] = scores.argmax(axis=1)
    return {"n": int(keep.sum()), "accuracy": float(credit.mean()), "balanced_accuracy": balanced_accuracy(credit, y),
            "per_class_recall": {int(c): float(credit[y == c].mean()) for c in np.unique(y)},
            "predictions": predictions.tolist()}


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int) -> torch.Tensor:
    """Multinomial logistic regression, mean cross-entropy + l2/2 |W|^2 (bias free), by L-BFGS.
    Returns [D+1, C] (weights, then the bias row)."""
    import torch

    w = torch.zeros(x.shape[1] + 1, n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w[:-1] + w[-1]
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.5 * l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    import torch

    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std < 1e-12] = 1.0
    return [torch.from_numpy((a - mean) / std) for a in (train, *others)]


def _predict(w: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    return (x @ w[:-1] + w[-1]).numpy()


def _stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        ids = rng.permutation(np.flatnonzero(y == c))
        fold[ids] = (np.arange(len(ids)) + rng.integers(folds)) % folds
    return fold


def linear_probe(train_x, train_y, test_x, test_y, *, l2: float | Sequence[float] = DEFAULT_L2,
                 folds: int = 3, max_iter: int = 200, seed: int = 0) -> dict[str, Any]:
    """A linear probe: logistic regression on `train_x` (features standardised with the training
    set's mean and std), tested on `test_x`. Labels are any values (ints or strings).

    l2: the L2 penalty, or candidates of which the one with the best mean balanced accuracy in
    stratified `folds`-fold cross-validation on the training set is used (the larger on a tie);
    when some class has fewer than 2 training samples the middle candidate is used.
    Test samples whose class never occurs in training count as errors.

    Returns {"n_train", "n", "classes", "l2", "l2_selection" ("fixed" | "cv" | "middle"),
    "accuracy", "balanced_accuracy", "predictions"}."""
    import torch

    train_x = _as_array(train_x, "train_x", 2).astype(np.float64)
    test_x = _as_array(test_x, "test_x", 2).astype(np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels must have the same number of rows")
    classes, y_idx = np.unique(train_y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes in training (got {len(classes)})")
    n_classes = len(classes)
    candidates = [float(l2)] if np.isscalar(l2) else [float(v) for v in l2]
    selection = "fixed"
    cv_scores: dict[str, float] = {}
    if len(candidates) > 1:
        counts = np.bincount(y_idx, minlength=n_classes)
        if counts.min() >= 2:
            k = int(min(folds, counts.min()))
            fold = _stratified_folds(y_idx, k, seed)
            for value in candidates:
                scores = []
                for f in range(k):
                    tr, va = fold != f, fold == f
                    xtr, xva = _standardise(train_x[tr], train_x[va])
                    w = _fit_logistic(xtr, torch.from_numpy(y_idx[tr]), n_classes, value, max_iter)
                    pred = _predict(w, xva).argmax(axis=1)
                    scores.append(balanced_accuracy((pred == y_idx[va]).astype(float), y_idx[va]))
                cv_scores[f"{value:g}"] = float(np.mean(scores))
            best = max(cv_scores.values())
            chosen = max(v for v in candidates if cv_scores[f"{v:g}"] >= best - 1e-12)
            selection = "cv"
        else:
            chosen = sorted(candidates)[len(candidates) // 2]
            selection = "middle"
    else:
        chosen = candidates[0]
    xtr, xte = _standardise(train_x, test_x)
    w = _fit_logistic(xtr, torch.from_numpy(y_idx), n_classes, chosen, max_iter)
    pred = classes[_predict(w, xte).argmax(axis=1)] if len(test_x) else np.array([], dtype=classes.dtype)
    correct = (pred == test_y).astype(float)
    out = {"n_train": len(train_x), "n": len(test_x), "classes": classes.tolist(), "l2": chosen,
           "l2_selection": selection, "accuracy": float(correct.mean()) if len(test_x) else None,
           "balanced_accuracy": balanced_accuracy(correct, test_y) if len(test_x) else None,
           "predictions": pred.tolist()}
    if cv_scores:
        out["cv_balanced_accuracy"] = cv_scores
    return out
