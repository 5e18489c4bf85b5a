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

The metric functions (facedata.flip.metrics) take plain embeddings and labels and know nothing of
models; the prompts and label readers are in facedata.flip.prompts, the printed table in
facedata.flip.report. `facedata eval CHECKPOINT --dataset DIR` runs it from the command line
(facedata.flip.eval_cli). The public benchmarks (CelebA, LFWA, caption sets) are evaluated by
facedata.flip.benchmark_eval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facedata.attributes.vocabulary import ATTRIBUTES
from facedata.core.errors import UserError
# metrics, prompts and the table are modules of their own; their names stay importable from here
from facedata.flip.metrics import (
    DEFAULT_KS,
    DEFAULT_L2,
    _l2_normalise,
    balanced_accuracy,
    linear_probe,
    retrieval_recall,
    zero_shot_accuracy,
)
from facedata.flip.prompts import PROMPTS, PromptSet, attribute_labels, class_names, prompts_for
from facedata.flip.report import format_eval_table

if TYPE_CHECKING:  # torch is imported where used: the command line's parser stays light
    import torch

log = logging.getLogger("facedata.flip")

__all__ = ["PROMPTS", "PromptSet", "attribute_labels", "balanced_accuracy", "class_names", "evaluate",
           "format_eval_table", "linear_probe", "prompts_for", "retrieval_recall", "zero_shot_accuracy"]

MIN_EVAL_SAMPLES = 100


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
