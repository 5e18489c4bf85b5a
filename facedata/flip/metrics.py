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

__all__ = ["ATTRIBUTE_L2", "DEFAULT_KS", "DEFAULT_L2", "TIE_TOL", "attribute_probe", "balanced_accuracy", "linear_probe",
           "multi_caption_recall", "retrieval_recall", "zero_shot_accuracy"]

DEFAULT_KS = (1, 5, 10)
TIE_TOL = 1e-6  # scores this close to the match's count as ties
DEFAULT_L2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# The per-attribute probe's penalties (on the mean loss, so l2 ~ 1 / (C * N) in sklearn's terms):
# wide, as CLIP's sweep is, since a rare attribute needs a weak penalty to be found at all
ATTRIBUTE_L2 = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


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


# ---------------------------------------------------------------------------------------------
# Several captions per image (CelebA caption sets, folders with many lines per image)


def _first_hit_within(above: np.ndarray, others_tied: np.ndarray, own_tied: np.ndarray, k: int) -> np.ndarray:
    """P(the first of `own_tied` relevant items lands within the top k) when `above` irrelevant
    items score strictly higher and the tied block (own_tied relevant + others_tied irrelevant)
    is ordered at random. The first relevant item sits at above + 1 + X, where X counts the
    irrelevant items before it in the tied block: P(X >= x) = C(t, x) / C(t + m, x)."""
    out = np.zeros(len(above))
    for i, (a, t, m) in enumerate(zip(above, others_tied, own_tied, strict=True)):
        x = k - a  # the hit is within k unless at least x irrelevant tied items come first
        if x <= 0:
            continue
        if x > t:
            out[i] = 1.0
            continue
        p_all_before = 1.0
        for j in range(x):
            p_all_before *= (t - j) / (t + m - j)
        out[i] = 1.0 - p_all_before
    return out


def multi_caption_recall(image_emb, text_emb, text_image, ks: Sequence[int] = DEFAULT_KS, *,
                         normalize: bool = True, tie_tol: float = TIE_TOL, chunk: int = 2048) -> dict[str, Any]:
    """Retrieval recall@k when each image has one or more captions (the protocol of CelebA caption
    sets, as COCO's): text->image takes every caption as a query, found when its own image ranks
    within k among all images; image->text takes every image as a query, found when any of its
    captions ranks within k among all captions. Ties are ordered at random (expected recall).

    image_emb [N, D]; text_emb [M, D]; text_image [M]: the index of each caption's image.
    Returns {"n_images", "n_captions", "image_to_text": {"R@k"}, "text_to_image": {"R@k"},
    "mean": the mean of all those recalls (the papers' "mean recall")}."""
    img = _as_array(image_emb, "image_emb", 2).astype(np.float64)
    txt = _as_array(text_emb, "text_emb", 2).astype(np.float64)
    owner = _as_array(text_image, "text_image", 1).astype(np.int64)
    if len(owner) != len(txt):
        raise ValueError(f"{len(txt)} captions but {len(owner)} caption->image indices")
    if len(owner) and (owner.min() < 0 or owner.max() >= len(img)):
        raise ValueError(f"text_image: indices must lie in 0..{len(img) - 1}")
    if img.shape[1:] != txt.shape[1:] and len(img) and len(txt):
        raise ValueError(f"image_emb {img.shape} and text_emb {txt.shape} differ in width")
    if normalize:
        img, txt = _l2_normalise(img), _l2_normalise(txt)
    out: dict[str, Any] = {"n_images": len(img), "n_captions": len(txt)}
    if len(img) == 0 or len(txt) == 0:
        return {**out, "image_to_text": {f"R@{k}": None for k in ks}, "text_to_image": {f"R@{k}": None for k in ks},
                "mean": None}
    # text -> image: one relevant image per caption, exactly the single-caption case
    above, tied = [], []
    for start in range(0, len(txt), chunk):
        rows = np.arange(start, min(len(txt), start + chunk))
        a, t = _ranks(txt[rows] @ img.T, owner[rows], tie_tol)
        above.append(a)
        tied.append(t)
    a_t, t_t = np.concatenate(above), np.concatenate(tied)
    out["text_to_image"] = {f"R@{k}": _recall_at(a_t, t_t, k) for k in ks}
    # image -> text: the best-scoring own caption decides; captions tied with it share its place
    own = np.zeros((len(img), len(txt)), dtype=bool)
    own[owner, np.arange(len(txt))] = True
    hits = {k: [] for k in ks}
    for start in range(0, len(img), chunk):
        rows = np.arange(start, min(len(img), start + chunk))
        scores = img[rows] @ txt.T
        mine = own[rows]
        best = np.where(mine, scores, -np.inf).max(axis=1, keepdims=True)
        has_caption = np.isfinite(best[:, 0])
        higher = scores > best + tie_tol
        level = np.abs(scores - best) <= tie_tol
        a = (higher & ~mine).sum(axis=1)
        t = (level & ~mine).sum(axis=1)
        m = (level & mine).sum(axis=1)
        for k in ks:
            h = _first_hit_within(a, t, np.maximum(m, 1), k)
            hits[k].append(h[has_caption])  # an image without captions cannot be a query
    out["image_to_text"] = {f"R@{k}": float(np.mean(np.concatenate(hits[k]))) for k in ks}
    recalls = [*out["image_to_text"].values(), *out["text_to_image"].values()]
    out["mean"] = float(np.mean(recalls))
    return out


# ---------------------------------------------------------------------------------------------
# Binary attributes (CelebA / LFWA's 40): one linear probe per attribute


def _fit_binary_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int) -> torch.Tensor:
    """Independent binary logistic regressions, one per column of y ([N, A] in {0, 1}), fitted
    together: mean binary cross-entropy per attribute + l2/2 |w_a|^2 (bias free). The objective is a
    sum over attributes with nothing shared, so the joint optimum is each attribute's own.
    Returns [D+1, A] (weights, then the bias row)."""
    import torch

    w = torch.zeros(x.shape[1] + 1, y.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=0).sum()
        loss = loss + 0.5 * l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def attribute_probe(train_x, train_y, val_x, val_y, test_x, test_y, *, names: Sequence[str] | None = None,
                    l2: float | Sequence[float] = ATTRIBUTE_L2, max_iter: int = 300) -> dict[str, Any]:
    """The attribute protocol of CelebA/LFWA papers (FaRL, FLIP): a linear classifier per binary
    attribute on frozen image features, trained on the train split, its L2 penalty chosen per
    attribute by validation accuracy (ties: the lower validation log-loss), and accuracy reported on the
    test split; the headline is the label-wise mean accuracy (mean over attributes).

    *_x: [N, D] features (standardised with the train split's mean and std); *_y: [N, A] labels in
    {0, 1} (CelebA's -1 read as 0). An attribute with one class in train predicts that class
    ("constant") and says so. Returns {"n_train", "n_val", "n_test", "mean_accuracy",
    "mean_balanced_accuracy", "attributes": {name: {"accuracy", "balanced_accuracy", "l2",
    "positive_rate_test", "majority_accuracy", "constant"}}}."""
    import torch

    xs = [_as_array(v, n, 2).astype(np.float64) for v, n in ((train_x, "train_x"), (val_x, "val_x"), (test_x, "test_x"))]
    ys = [_as_array(v, n, 2).astype(np.float64) for v, n in ((train_y, "train_y"), (val_y, "val_y"), (test_y, "test_y"))]
    for x, y, n in zip(xs, ys, ("train", "val", "test"), strict=True):
        if len(x) != len(y):
            raise ValueError(f"{n}: {len(x)} feature rows but {len(y)} label rows")
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError(f"{n}: labels must be 0 or 1")
    n_attr = ys[0].shape[1]
    if ys[1].shape[1] != n_attr or ys[2].shape[1] != n_attr:
        raise ValueError("train, validation and test labels must have the same attributes")
    names = list(names) if names is not None else [str(i) for i in range(n_attr)]
    if len(xs[0]) == 0 or len(xs[2]) == 0:
        raise ValueError("the probe needs train and test samples")
    candidates = [float(l2)] if np.isscalar(l2) else sorted(float(v) for v in l2)
    xtr, xva, xte = _standardise(*xs)
    # an attribute with one value in train has no finite optimum (its bias runs off to infinity and
    # would stall the joint L-BFGS): it is left out of the fit and predicts that value
    train_rate = ys[0].mean(axis=0)
    varying = np.flatnonzero((train_rate > 0) & (train_rate < 1))
    ytr = torch.from_numpy(np.ascontiguousarray(ys[0][:, varying]))
    val_acc = np.zeros((len(candidates), n_attr))
    val_loss = np.zeros((len(candidates), n_attr))
    test_pred = np.zeros((len(candidates), len(xs[2]), n_attr), dtype=bool)
    for i, value in enumerate(candidates):
        if not len(varying):
            break
        w = _fit_binary_logistic(xtr, ytr, value, max_iter)
        if len(xs[1]):
            logits, truth = _predict(w, xva), ys[1][:, varying]
            val_acc[i, varying] = ((logits > 0) == (truth > 0.5)).mean(axis=0)
            val_loss[i, varying] = (np.logaddexp(0, logits) - truth * logits).mean(axis=0)
        test_pred[i][:, varying] = _predict(w, xte) > 0
    val_acc_arr = val_acc  # [L, A]
    # per attribute: the best validation accuracy; among equals (a small validation split often
    # ties, e.g. one without positives) the lower validation log-loss, then the larger penalty
    chosen = np.array([min((i for i in range(len(candidates)) if val_acc_arr[i, a] >= val_acc_arr[:, a].max() - 1e-12),
                           key=lambda i: (round(val_loss[i, a], 9), -i)) for a in range(n_attr)])
    attributes: dict[str, Any] = {}
    for a, name in enumerate(names):
        truth = ys[2][:, a] > 0.5
        train_pos = train_rate[a]
        constant = a not in set(varying.tolist())
        pred = np.full(len(truth), train_pos == 1.0) if constant else test_pred[chosen[a]][:, a]
        correct = (pred == truth).astype(float)
        attributes[name] = {
            "accuracy": float(correct.mean()), "balanced_accuracy": balanced_accuracy(correct, truth),
            "l2": None if constant else candidates[chosen[a]], "constant": bool(constant),
            "validation_accuracy": None if constant or not len(xs[1]) else float(val_acc_arr[chosen[a], a]),
            "positive_rate_test": float(truth.mean()), "majority_accuracy": float(max(truth.mean(), 1 - truth.mean())),
        }
    return {"n_train": len(xs[0]), "n_val": len(xs[1]), "n_test": len(xs[2]), "l2_candidates": candidates,
            "l2_selection": "validation" if len(xs[1]) and len(candidates) > 1 else "fixed",
            "mean_accuracy": float(np.mean([v["accuracy"] for v in attributes.values()])),
            "mean_balanced_accuracy": float(np.mean([v["balanced_accuracy"] for v in attributes.values()])),
            "attributes": attributes}
