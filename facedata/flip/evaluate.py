"""FLIP evaluation on identity-disjoint held-out data, against the same model at random initialisation.

`evaluate(checkpoint, dataset_dir)` follows FLIP's (and CLIP's) protocol:

- **Retrieval**: image->text and text->image recall@1/5/10 over the held-out samples, each
  image's own face caption being its only match. Ties are counted honestly: a query whose match
  shares its score with t other candidates gets the expected recall under a random order of the
  tied ones (so a model whose embeddings are all equal scores K/N, not 1.0 or 0.0).
- **Zero-shot attribute classification**: each class of an attribute (gender, age band,
  expression, smiling, hair colour, eyeglasses, ...) is described by several prompts (templates x
  phrasings, `PROMPTS`); their normalised text embeddings are averaged into one class embedding
  (CLIP's prompt ensembling) and an image takes the class it is most similar to. The candidates are
  the attribute's whole vocabulary; labels are the primary face's published (confident) values.
  Accuracy and balanced accuracy (mean per-class recall) per attribute; attributes with fewer
  than 2 classes among the labels are skipped and say why.
- **Linear probe**: multinomial logistic regression on frozen image features (the image tower's
  projected embedding, standardised), full-batch L-BFGS in torch with an L2 penalty chosen by
  stratified cross-validation on the training split; trained on the train split's features and
  tested on the held-out split.

Retrieval is also reported on (up to 20k samples of) the train split as `train_retrieval`: how well
training fitted its captions, not a held-out figure.

Each figure is computed for the trained model and for the same architecture at the random
initialisation training started from (the checkpoint's config and seed: the very weights of step
0), with the difference, so it shows what training bought. A held-out test split smaller than
`min_samples` is pooled with the validation split (both are identity-disjoint from train).

The metric functions (`retrieval_recall`, `zero_shot_accuracy`, `linear_probe`) take plain
embeddings and labels and know nothing of models. `facedata eval CHECKPOINT --dataset DIR` runs it
from the command line (`add_eval_parser`, `run_eval_command`).
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facedata.attributes.vocabulary import ATTRIBUTES
from facedata.core.errors import UserError

if TYPE_CHECKING:  # torch is imported where used: the command line's parser stays light
    import torch

log = logging.getLogger("facedata.flip")

__all__ = ["PROMPTS", "PromptSet", "add_eval_parser", "attribute_labels", "balanced_accuracy", "class_names",
           "evaluate", "format_eval_table", "linear_probe", "prompts_for", "retrieval_recall",
           "run_eval_command", "zero_shot_accuracy"]

DEFAULT_KS = (1, 5, 10)
TIE_TOL = 1e-6  # scores this close to the match's count as ties
DEFAULT_L2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
MIN_EVAL_SAMPLES = 100


# ---------------------------------------------------------------------------------------------
# Pure metrics


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
# Prompts and labels


@dataclass(frozen=True)
class PromptSet:
    """Zero-shot prompts of one attribute: every template is filled with every phrase of a class."""

    templates: tuple[str, ...]
    classes: dict[str, tuple[str, ...]]  # class value ("true"/"false" for a bool) -> phrases


_PERSON = ("a photo of {}.", "a close-up photo of {}.", "a portrait of {}.", "an image of {}.", "the face of {}.")
_LOOKS = ("a face of a person who looks {}.", "a photo of a person looking {}.", "a close-up of a {} face.",
          "a photo of a {} person.")
_SHOT = ("a {} photo of a person.", "a {} close-up of a face.", "a {} portrait.", "a {} picture of someone.")

# Phrasings follow the words facedata captions use (facedata.captions.compose), so a model trained on them
# has seen them; several per class, averaged as CLIP's prompt ensembles are.
PROMPTS: dict[str, PromptSet] = {
    "gender": PromptSet(_PERSON[:4], {
        "female": ("a woman", "a lady", "a female face"), "male": ("a man", "a gentleman", "a male face")}),
    "age_band": PromptSet(_PERSON, {
        "child": ("a child", "a kid", "a young child"), "teenager": ("a teenager", "a teen"),
        "young adult": ("a young adult", "a young person in their twenties"),
        "adult": ("an adult", "an adult in their thirties"),
        "middle-aged": ("a middle-aged person", "a person in their fifties"),
        "senior": ("an elderly person", "an older person", "a senior")}),
    "expression": PromptSet(_LOOKS, {
        "angry": ("angry",), "disgust": ("disgusted",), "fear": ("frightened", "scared"),
        "happy": ("happy", "cheerful"), "sad": ("sad", "unhappy"), "surprise": ("surprised", "astonished"),
        "neutral": ("expressionless", "calm", "straight-faced")}),
    "smiling": PromptSet(_PERSON, {
        "true": ("a smiling person", "a person with a smile", "a grinning person"),
        "false": ("a person who is not smiling", "an unsmiling person", "a person with a straight face")}),
    "mouth_open": PromptSet(_PERSON, {
        "true": ("a person with an open mouth", "an open-mouthed person", "a person with parted lips"),
        "false": ("a person with a closed mouth", "a person with closed lips")}),
    "hair_color": PromptSet(_PERSON, {
        c: tuple(f"a person with {w} hair" for w in words)
        for c, words in {"black": ("black", "jet-black"), "brown": ("brown", "chestnut-brown"),
                         "blond": ("blond", "blonde"), "red": ("red", "ginger"), "gray": ("gray", "grey"),
                         "white": ("white",)}.items()}),
    "hair_length": PromptSet(_PERSON, {
        "bald": ("a bald person", "a person with no hair"),
        "short": ("a person with short hair", "a person with close-cropped hair"),
        "medium": ("a person with medium-length hair", "a person with shoulder-length hair"),
        "long": ("a person with long hair",)}),
    "bangs": PromptSet(_PERSON, {"true": ("a person with bangs", "a person with a fringe"),
                                 "false": ("a person without bangs", "a person with no fringe")}),
    "eyeglasses": PromptSet(_PERSON, {
        "true": ("a person wearing glasses", "a person with eyeglasses", "a bespectacled person"),
        "false": ("a person without glasses", "a person wearing no glasses")}),
    "hat": PromptSet(_PERSON, {"true": ("a person wearing a hat", "a person in a hat"),
                               "false": ("a person without a hat", "a bareheaded person")}),
    "earrings": PromptSet(_PERSON, {"true": ("a person wearing earrings", "a person with earrings"),
                                    "false": ("a person without earrings", "a person wearing no earrings")}),
    "necklace": PromptSet(_PERSON, {"true": ("a person wearing a necklace", "a person with a necklace"),
                                    "false": ("a person without a necklace", "a person wearing no necklace")}),
    "beard": PromptSet(_PERSON, {"true": ("a person with a beard", "a bearded person"),
                                 "false": ("a clean-shaven person", "a person without a beard")}),
    "pose": PromptSet(_PERSON, {
        "frontal": ("a person facing the camera", "a person seen from the front"),
        "three-quarter": ("a person turned slightly to one side", "a person in three-quarter view"),
        "profile": ("a person in profile", "a person seen from the side"),
        "looking up": ("a person looking up", "a person gazing upward"),
        "looking down": ("a person looking down", "a person gazing downward")}),
    "sharpness": PromptSet(_SHOT, {"sharp": ("sharp", "crisp", "in-focus"), "soft": ("slightly soft", "soft-focus"),
                                   "blurry": ("blurry", "blurred", "out-of-focus")}),
    "lighting": PromptSet(_SHOT, {"well lit": ("well-lit", "brightly lit", "evenly lit"),
                                  "dim": ("dim", "dimly lit", "low-light"),
                                  "overexposed": ("overexposed", "washed-out")}),
    "resolution": PromptSet(_SHOT, {"high resolution": ("high-resolution", "hi-res"),
                                    "medium resolution": ("medium-resolution", "mid-resolution"),
                                    "low resolution": ("low-resolution", "pixelated", "low-res")}),
}


_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiou])")  # "a angry face" -> "an angry face"


def class_names(attribute: str) -> list[str]:
    """An attribute's classes as label strings: its vocabulary values, or false/true for a bool."""
    spec = ATTRIBUTES[attribute]
    return ["false", "true"] if spec.kind == "bool" else list(spec.values)


def prompts_for(attribute: str) -> dict[str, list[str]]:
    """class -> the prompts describing it (every template filled with every phrase)."""
    ps = PROMPTS[attribute]
    return {c: [_ARTICLE.sub(r"\1n ", t.format(p)) for t in ps.templates for p in ps.classes[c]]
            for c in class_names(attribute)}


def _label(value: Any, kind: str) -> str | None:
    if value is None:
        return None
    if kind == "bool":
        return "true" if bool(value) else "false"
    return str(value)


def attribute_labels(meta: dict[str, Any], attributes: Sequence[str], min_confidence: float = 0.0) -> dict[str, str]:
    """The primary face's confident attribute values in a sample's published metadata, as label
    strings ("true"/"false" for bools). A value the publisher left null (not confident) is absent,
    and so is one whose confidence is under min_confidence."""
    faces = meta.get("faces") or []
    face = next((f for f in faces if isinstance(f, dict) and f.get("primary")), None)
    if face is None and len(faces) == 1 and isinstance(faces[0], dict):
        face = faces[0]
    if not isinstance(face, dict):
        return {}
    values = face.get("attributes") or face.get("values") or {}
    confidences = face.get("confidences") or {}
    out = {}
    for name in attributes:
        label = _label(values.get(name), ATTRIBUTES[name].kind)
        conf = confidences.get(name)
        if label is None or (min_confidence > 0 and (conf is None or conf < min_confidence)):
            continue
        if label in class_names(name):
            out[name] = label
    return out


# ---------------------------------------------------------------------------------------------
# Models and features


@dataclass
class _Loaded:
    model: torch.nn.Module
    baseline: Callable[[], torch.nn.Module]  # builds the random-init model of the same architecture
    tokenizer: Callable
    transform: Callable
    image_size: int
    use_crops: bool
    crop_scale: float
    seed: int
    info: dict[str, Any]


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The model `build` makes with torch's global RNG seeded as train() seeds it, without
    disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _load(source, seed: int | None, use_crops: bool | None, crop_scale: float | None) -> _Loaded:
    from facedata.flip.config import ModelSection, TrainConfig
    from facedata.flip.model import FlipModel, create_model, eval_transform, get_tokenizer

    if isinstance(source, FlipModel):
        section = ModelSection(config=source.model_config)
        size = source.image_size if isinstance(source.image_size, int) else max(source.image_size)
        seed = 0 if seed is None else seed
        return _Loaded(source.model, lambda: create_model(section), source.tokenizer, source.eval_transform,
                       size, bool(use_crops), crop_scale or 1.5, seed,
                       {"checkpoint": None, "step": None})
    from facedata.flip.embed import read_checkpoint

    ckpt, state = read_checkpoint(source)
    try:
        cfg = TrainConfig.model_validate(state["config"])
    except Exception as err:
        raise UserError(f"{ckpt}: its training config no longer validates: {' '.join(str(err).split())[:300]}") \
            from None
    section = cfg.model.model_copy(update={"pretrained": None})
    if state.get("model_config") is not None and section.resolved() != state["model_config"]:
        # open_clip's named config changed since training: build from the config the run used
        section = ModelSection(config=state["model_config"], mean=section.mean, std=section.std)
    seed = cfg.training.seed if seed is None else seed
    model = create_model(section)
    try:
        model.load_state_dict(state["state_dict"], strict=True)
    except RuntimeError as err:
        raise UserError(f"{ckpt}: weights do not fit the model: {' '.join(str(err).split())[:300]}") from None
    vision = section.resolved()["vision_cfg"].get("image_size", 224)
    size = vision if isinstance(vision, int) else max(vision)
    return _Loaded(model, lambda: create_model(section), get_tokenizer(section), eval_transform(section), size,
                   cfg.data.use_crops if use_crops is None else use_crops,
                   crop_scale or cfg.data.crop_scale, seed,
                   {"checkpoint": str(ckpt), "step": state.get("step"),
                    "pretrained_start": cfg.model.pretrained})


@dataclass
class _SplitData:
    name: str  # "validation+test"
    splits: list[str]
    keys: list[str]
    captions: list[str]
    labels: list[dict[str, str]]
    identities: list[Any]
    images: dict[str, np.ndarray]  # model name -> [N, D] image features (projected, not normalised)
    texts: dict[str, np.ndarray]  # model name -> [N, D] caption features


def _extract(models: dict[str, torch.nn.Module], loaded: _Loaded, dataset_dir: Path, splits: list[str],
             attributes: Sequence[str], min_confidence: float, batch_size: int, device: torch.device,
             workers: int, limit: int | None, seed: int, progress: bool) -> _SplitData:
    import torch
    from facedata.core.progress import progress_bar

    from facedata.flip.data import FaceTextDataset, LoadFailure, _worker_init, collate, index_split

    keys, captions, labels, identities = [], [], [], []
    feats: dict[str, list[np.ndarray]] = {m: [] for m in models}
    tfeats: dict[str, list[np.ndarray]] = {m: [] for m in models}
    for split in splits:
        index = index_split(dataset_dir, split)
        ids = np.arange(len(index))
        if limit is not None and len(ids) > limit:
            ids = np.sort(np.random.default_rng([seed, len(index)]).choice(len(index), limit, replace=False))
        ds = FaceTextDataset(index, loaded.tokenizer, loaded.transform, loaded.use_crops, loaded.crop_scale,
                             decode_side=loaded.image_size)
        for i in ids:
            meta = ds.metadata(int(i))
            keys.append(str(index.keys[i]))
            captions.append(ds.caption(int(i)))
            labels.append(attribute_labels(meta, attributes, min_confidence))
            identities.append(meta.get("identity_id"))
        batches = [[(int(i), 0) for i in ids[s:s + batch_size]] for s in range(0, len(ids), batch_size)]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                             worker_init_fn=_worker_init if workers else None)
        for batch in progress_bar(loader, total=len(batches), desc=f"features {split}", unit="batch", progress=progress):
            if isinstance(batch, LoadFailure):
                raise UserError(batch.message)
            images, tokens = batch[0].to(device), batch[1].to(device)
            for name, model in models.items():
                feats[name].append(model.encode_image(images).float().cpu().numpy())
                tfeats[name].append(model.encode_text(tokens).float().cpu().numpy())
    return _SplitData("+".join(splits), splits, keys, captions, labels, identities,
                      {m: np.concatenate(v) if v else np.zeros((0, 0)) for m, v in feats.items()},
                      {m: np.concatenate(v) if v else np.zeros((0, 0)) for m, v in tfeats.items()})


def _class_embeddings(model: torch.nn.Module, tokenizer: Callable, attribute: str, device: torch.device) -> np.ndarray:
    """[C, D] class embeddings: the mean of each class's normalised prompt embeddings."""
    prompts = prompts_for(attribute)
    per_class = [prompts[c] for c in class_names(attribute)]
    flat = [t for v in per_class for t in v]
    emb = _l2_normalise(model.encode_text(tokenizer(flat).to(device)).float().cpu().numpy().astype(np.float64))
    bounds = np.cumsum([0] + [len(v) for v in per_class])
    return np.stack([emb[bounds[i]:bounds[i + 1]].mean(axis=0) for i in range(len(per_class))])


# ---------------------------------------------------------------------------------------------
# Evaluation


def _pick_splits(dataset_dir: Path, split: str, min_samples: int) -> tuple[list[str], str | None]:
    from facedata.flip.data import index_split

    wds = dataset_dir / "webdataset"
    if not dataset_dir.is_dir():
        raise UserError(f"--dataset: {dataset_dir}: no such folder (a dataset written by facedata publish)")
    if not wds.is_dir():
        raise UserError(f"--dataset: {dataset_dir}: no webdataset/ folder in it (is it a published facedata dataset?)")
    have = sorted({p.name.rsplit("-", 1)[0] for p in wds.glob("*-*.tar")})
    splits = split.split("+")
    if split == "test" and "test" not in have and "validation" in have:
        return ["validation"], "no test split: evaluated on validation"
    for s in splits:
        if s not in have:
            raise UserError(f"--split: {wds}: no {s}-*.tar shards (splits there: {', '.join(have) or 'none'})")
    if split == "test" and min_samples > 0 and "validation" in have:
        n = len(index_split(dataset_dir, "test"))
        if n < min_samples:
            return ["validation", "test"], (f"test has {n} samples (< {min_samples}): pooled with validation "
                                            "(both identity-disjoint from train)")
    return splits, None


def _compare(trained: float | None, random_init: float | None) -> dict[str, float | None]:
    diff = trained - random_init if trained is not None and random_init is not None else None
    return {"trained": trained, "random_init": random_init, "difference": diff}


def _retrieval_block(data: _SplitData, names: list[str], ks: Sequence[int]) -> dict[str, Any]:
    res = {m: retrieval_recall(data.images[m], data.texts[m], ks) for m in names}
    first = res[names[0]]
    out: dict[str, Any] = {"n": first["n"], "chance": {f"R@{k}": min(1.0, k / first["n"]) if first["n"] else None
                                                       for k in ks}}
    for direction in ("image_to_text", "text_to_image"):
        out[direction] = {key: _compare(res["trained"][direction][key],
                                        res["random_init"][direction][key] if "random_init" in res else None)
                          for key in first[direction]}
    out["mean_rank"] = {d: _compare(res["trained"]["mean_rank"][d],
                                    res["random_init"]["mean_rank"][d] if "random_init" in res else None)
                        for d in ("image_to_text", "text_to_image")}
    return out


def _mean_of(blocks: dict[str, dict], metric: str) -> dict[str, float | None]:
    vals = [b[metric] for b in blocks.values()]
    if not vals:
        return _compare(None, None)
    t = float(np.mean([v["trained"] for v in vals]))
    r = [v["random_init"] for v in vals]
    return _compare(t, float(np.mean(r)) if all(x is not None for x in r) else None)


def evaluate(checkpoint_or_model, dataset_dir: str | Path, *, split: str = "test", train_split: str = "train",
             min_samples: int = MIN_EVAL_SAMPLES, attributes: Sequence[str] | None = None,
             ks: Sequence[int] = DEFAULT_KS, min_confidence: float = 0.0, probe: bool = True,
             compare_random: bool = True, max_train_samples: int | None = 20_000, max_eval_samples: int | None = None,
             l2: float | Sequence[float] = DEFAULT_L2, seed: int | None = None, use_crops: bool | None = None,
             crop_scale: float | None = None, batch_size: int = 64, device: str = "auto", workers: int = 0,
             threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Evaluate a FLIP model on a published dataset's held-out split (see the module docstring).

    checkpoint_or_model: a facedata checkpoint (`checkpoints/step_*.pt`), a run folder (its newest
    checkpoint) or a `FlipModel` (then `seed` gives the random initialisation to compare with,
    default 0, and `use_crops` defaults to False). Faces are cut as in training (the checkpoint's
    data.use_crops and crop_scale) unless use_crops / crop_scale say otherwise.

    split: the held-out split ("a+b" pools several); the default "test" is pooled with validation
    when it holds fewer than min_samples samples, or replaced by validation when absent.
    train_split: where the linear probe is trained (at most max_train_samples samples, a seeded
    subset); its retrieval is reported too, as `train_retrieval` (how well training fit, not a
    held-out figure). attributes: those to classify (default: every category and bool attribute of
    the vocabulary); labels are the primary face's published values (with confidence >=
    min_confidence when that is > 0).

    Returns a JSON-ready dict: `retrieval`, `zero_shot` and `linear_probe` per attribute, their
    means over attributes, `train_retrieval`, `skipped` (attribute -> why), and where every figure
    is {"trained", "random_init", "difference"}."""
    import torch

    t0 = time.perf_counter()
    dataset_dir = Path(dataset_dir)
    attributes = list(attributes) if attributes is not None else [
        a for a, spec in ATTRIBUTES.items() if spec.kind in ("category", "bool") and a in PROMPTS]
    for a in attributes:
        if a not in PROMPTS:
            raise UserError(f"attributes: {a!r} has no zero-shot prompts (known: {', '.join(PROMPTS)})")
    eval_splits, note = _pick_splits(dataset_dir, split, min_samples)
    if train_split in eval_splits:
        raise UserError(f"--split: {'+'.join(eval_splits)} includes the probe's training split {train_split}")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        loaded = _load(checkpoint_or_model, seed, use_crops, crop_scale)
        from facedata.flip.embed import resolve_device

        dev = resolve_device(device, "--device")
        models = {"trained": loaded.model}
        if compare_random:
            models["random_init"] = _seeded(loaded.seed, loaded.baseline)
        was = {n: (m.training, next(m.parameters()).device) for n, m in models.items()}
        for m in models.values():
            m.to(dev).eval()
        common = {"loaded": loaded, "dataset_dir": dataset_dir, "attributes": attributes,
                  "min_confidence": min_confidence, "batch_size": batch_size, "device": dev,
                  "workers": workers, "seed": loaded.seed, "progress": progress}
        try:
            with torch.no_grad():
                held = _extract(models, splits=eval_splits, limit=max_eval_samples, **common)
                train = _extract(models, splits=[train_split], limit=max_train_samples, **common)
                class_emb = {a: {n: _class_embeddings(m, loaded.tokenizer, a, dev) for n, m in models.items()}
                             for a in attributes}
        finally:
            for n, m in models.items():  # a model passed in is handed back as it came
                m.to(was[n][1]).train(was[n][0])
    finally:
        torch.set_num_threads(old_threads)

    names = list(models)
    results: dict[str, Any] = {
        **loaded.info, "dataset": str(dataset_dir), "eval_splits": held.splits, "split_note": note,
        "n_eval": len(held.keys), "train_split": train_split, "n_train": len(train.keys),
        "random_init_seed": loaded.seed if compare_random else None, "use_crops": loaded.use_crops,
        "device": str(dev), "attributes": attributes, "min_confidence": min_confidence,
    }
    if compare_random and loaded.info.get("pretrained_start"):
        results["baseline_note"] = (f"training started from {loaded.info['pretrained_start']}; random_init is the "
                                    "architecture's random initialisation, not that starting point")
    held_ids = {i for i in held.identities if i is not None}
    train_ids = {i for i in train.identities if i is not None}
    results["identities"] = {"eval": len(held_ids), "train": len(train_ids), "shared": len(held_ids & train_ids)}
    if held_ids & train_ids:
        log.warning("%d identities appear in both %s and %s: the held-out figures are not identity-disjoint",
                    len(held_ids & train_ids), held.name, train_split)
    if len(held.keys) == 0:
        raise UserError(f"{dataset_dir}: the {held.name} split holds no samples")

    results["retrieval"] = _retrieval_block(held, names, ks)
    results["train_retrieval"] = _retrieval_block(train, names, ks)

    skipped: dict[str, dict[str, str]] = {"zero_shot": {}, "linear_probe": {}}
    zero_shot: dict[str, Any] = {}
    for a in attributes:
        classes = class_names(a)
        y = np.array([classes.index(lab[a]) if a in lab else -1 for lab in held.labels])
        present = sorted({classes[i] for i in y if i >= 0})
        if len(present) < 2:
            skipped["zero_shot"][a] = (f"{len(present)} class among {int((y >= 0).sum())} labelled samples"
                                       + (f" ({present[0]})" if present else ""))
            continue
        res = {n: zero_shot_accuracy(held.images[n], class_emb[a][n], y) for n in names}
        r = res.get("random_init")
        counts = {c: int((y == classes.index(c)).sum()) for c in present}
        zero_shot[a] = {
            "n": res["trained"]["n"], "classes": classes, "present": counts,
            # a classifier guessing among the candidate classes; always answering the commonest class
            "chance_balanced_accuracy": 1 / len(classes),
            "majority_class_accuracy": max(counts.values()) / sum(counts.values()),
            "accuracy": _compare(res["trained"]["accuracy"], r and r["accuracy"]),
            "balanced_accuracy": _compare(res["trained"]["balanced_accuracy"], r and r["balanced_accuracy"]),
        }
    results["zero_shot"] = zero_shot
    results["zero_shot_mean"] = {m: _mean_of(zero_shot, m) for m in ("accuracy", "balanced_accuracy")}

    probe_res: dict[str, Any] = {}
    if probe:
        for a in attributes:
            lab_tr = [(i, lab[a]) for i, lab in enumerate(train.labels) if a in lab]
            lab_te = [(i, lab[a]) for i, lab in enumerate(held.labels) if a in lab]
            cls_tr = sorted({v for _, v in lab_tr})
            cls_te = sorted({v for _, v in lab_te})
            if len(cls_tr) < 2 or len(cls_te) < 2:
                skipped["linear_probe"][a] = (f"{len(cls_tr)} class(es) in {train_split}, {len(cls_te)} in "
                                              f"{held.name}")
                continue
            itr, ytr = zip(*lab_tr, strict=True)
            ite, yte = zip(*lab_te, strict=True)
            res = {n: linear_probe(train.images[n][list(itr)], np.array(ytr), held.images[n][list(ite)],
                                   np.array(yte), l2=l2, seed=loaded.seed) for n in names}
            r = res.get("random_init")
            counts = [sum(v == c for v in yte) for c in cls_te]
            probe_res[a] = {
                "n_train": len(itr), "n": len(ite), "classes_train": cls_tr,
                "present": dict(zip(cls_te, counts, strict=True)),
                "l2": {n: res[n]["l2"] for n in names}, "l2_selection": res["trained"]["l2_selection"],
                "accuracy": _compare(res["trained"]["accuracy"], r and r["accuracy"]),
                "balanced_accuracy": _compare(res["trained"]["balanced_accuracy"], r and r["balanced_accuracy"]),
                "majority_class_accuracy": max(counts) / sum(counts),
            }
    results["linear_probe"] = probe_res
    results["linear_probe_mean"] = {m: _mean_of(probe_res, m) for m in ("accuracy", "balanced_accuracy")}
    results["skipped"] = skipped
    results["wall_s"] = round(time.perf_counter() - t0, 2)
    return results


# ---------------------------------------------------------------------------------------------
# Reporting and the command


def _f(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def format_eval_table(results: dict[str, Any]) -> str:
    """A short table: every figure for the trained and the random-init model and their difference."""
    lines = []
    where = results.get("checkpoint") or "model"
    step = f" (step {results['step']})" if results.get("step") is not None else ""
    lines.append(f"FLIP eval of {where}{step}")
    lines.append(f"held-out: {'+'.join(results['eval_splits'])}, {results['n_eval']} samples; probe trained on "
                 f"{results['train_split']} ({results['n_train']}); identities shared: "
                 f"{results['identities']['shared']}")
    if results.get("split_note"):
        lines.append(f"note: {results['split_note']}")
    rows: list[tuple[str, str, dict]] = []
    for block, label in (("retrieval", "retrieval"), ("train_retrieval", "train fit")):
        b = results.get(block)
        if not b:
            continue
        for direction, short in (("image_to_text", "i->t"), ("text_to_image", "t->i")):
            for key, v in b[direction].items():
                rows.append((f"{label} {short} {key}", str(b["n"]), v))
    for block, label in (("zero_shot", "zero-shot"), ("linear_probe", "probe")):
        for a, b in results.get(block, {}).items():
            rows.append((f"{label} {a} acc", str(b["n"]), b["accuracy"]))
            rows.append((f"{label} {a} bal-acc", str(b["n"]), b["balanced_accuracy"]))
        mean = results.get(f"{block}_mean", {})
        if results.get(block):
            rows.append((f"{label} mean bal-acc", f"{len(results[block])} attr", mean["balanced_accuracy"]))
    width = max([len(r[0]) for r in rows] + [6])
    lines.append(f"{'metric':<{width}}  {'n':>7}  {'trained':>7}  {'random':>7}  {'diff':>7}")
    for name, n, v in rows:
        lines.append(f"{name:<{width}}  {n:>7}  {_f(v['trained']):>7}  {_f(v['random_init']):>7}  "
                     f"{_f(v['difference'], True):>7}")
    for block, why in results.get("skipped", {}).items():
        if why:
            lines.append(f"skipped ({block}): " + "; ".join(f"{a}: {w}" for a, w in why.items()))
    return "\n".join(lines)


def add_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="Evaluate a FLIP checkpoint: retrieval, zero-shot and linear-probe attributes.",
        description="Evaluate a FLIP checkpoint on a published dataset's identity-disjoint held-out split "
                    "(image<->text retrieval R@1/5/10, zero-shot attribute classification from prompts, a "
                    "linear probe on frozen image features), each against the same architecture at its "
                    "random initialisation.")
    p.add_argument("checkpoint", type=Path, help="a checkpoint (checkpoints/step_*.pt) or a training output.dir")
    p.add_argument("--dataset", type=Path, required=True, help="a published dataset folder (DEST of facedata publish)")
    p.add_argument("--split", default="test",
                   help="held-out split, or several joined by + (default: test, pooled with validation when it "
                        "has fewer than --min-samples samples)")
    p.add_argument("--train-split", default="train", help="split the linear probe is trained on (default: train)")
    p.add_argument("--min-samples", type=int, default=MIN_EVAL_SAMPLES,
                   help=f"pool a smaller test split with validation (default: {MIN_EVAL_SAMPLES}; 0: never)")
    p.add_argument("--out", type=Path, help="results JSON (default: eval_SPLIT.json in the checkpoint's run folder)")
    p.add_argument("--attributes", help="comma-separated attributes (default: all with prompts)")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="only labels at least this confident (default: every published value)")
    p.add_argument("--max-train-samples", type=int, default=20_000,
                   help="probe training samples at most (a seeded subset; default: 20000)")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    p.add_argument("--no-random", action="store_true", help="skip the random-initialisation comparison")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int, default=2, help="image loading processes (default: 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _default_out(checkpoint: Path, split: str) -> Path:
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder / f"eval_{split.replace('+', '_')}.json"


def run_eval_command(args) -> int:
    from facedata.core.shards import write_json

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--min-samples", args.min_samples, 0),
                             ("--max-train-samples", args.max_train_samples, 1)):
        if value < low:
            raise UserError(f"facedata eval: {flag}: expected at least {low} (got {value})")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"facedata eval: --threads: expected at least 1 (got {args.threads})")
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()] if args.attributes else None
    for a in attributes or ():
        if a not in PROMPTS:
            raise UserError(f"facedata eval: --attributes: unknown attribute {a!r} (known: {', '.join(PROMPTS)})")
    results = evaluate(args.checkpoint, args.dataset, split=args.split, train_split=args.train_split,
                       min_samples=args.min_samples, attributes=attributes, min_confidence=args.min_confidence,
                       probe=not args.no_probe, compare_random=not args.no_random,
                       max_train_samples=args.max_train_samples, batch_size=args.batch_size, device=args.device,
                       workers=args.workers, threads=args.threads, progress=not args.no_progress)
    out = args.out or _default_out(args.checkpoint, "+".join(results["eval_splits"]))
    write_json(out, results)
    print(format_eval_table(results))
    print(f"results: {out}")
    return 0

