"""Public-benchmark evaluation: the FLIP/FaRL protocols on CelebA, LFWA and caption sets, with
several models side by side.

- Attributes (`celeba-attr`, `lfwa-attr`): frozen image features (each model's projected image
  embedding), one linear probe per attribute trained on the train split, its L2 chosen on the
  validation split, accuracy on the test split; the headline is the label-wise mean accuracy
  (metrics.attribute_probe). A "majority class" row (each attribute's commonest train value) shows
  what the labels alone give.
- Retrieval (`celeba-caption`, `folder-retrieval`): every image and every caption embedded; R@1/5/10
  text->image (each caption a query) and image->text (found when any of the image's captions ranks
  within k), and the mean of the six (metrics.multi_caption_recall).

`run_benchmark(bench, encoders)` returns a JSON-ready dict; `write_tables(results, out_dir)` writes
`results.json`, `table.csv`, `table.md` (and, for attributes, `per_attribute.csv`) and `table.png`.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facedata.flip.benchmarks import AttributeBenchmark, RetrievalBenchmark
from facedata.flip.encoders import Encoder
from facedata.flip.metrics import ATTRIBUTE_L2, DEFAULT_KS, attribute_probe, balanced_accuracy, multi_caption_recall

__all__ = ["format_markdown", "image_features", "run_benchmark", "text_features", "write_tables"]

RETRIEVAL_COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean")


class _ImageFiles:
    """A map-style dataset: index -> the image file through the model's eval transform."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        from facedata.core.errors import UserError

        try:
            with Image.open(self.paths[i]) as im:
                return self.transform(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise UserError(f"{self.paths[i]}: not a readable image ({err})") from None


def image_features(encoder: Encoder, paths: Sequence[Path], *, batch_size: int = 64, workers: int = 0,
                   device=None, progress: bool = False) -> np.ndarray:
    """[N, D] float32 projected image embeddings (not normalised: the probe standardises them and
    retrieval normalises them)."""
    import torch

    from facedata.core.progress import progress_bar

    model = encoder.flip.model
    device = device or next(model.parameters()).device
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, encoder.flip.eval_transform), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    out = []
    with torch.no_grad():
        for batch in progress_bar(loader, total=len(loader), desc=f"images {encoder.label}", unit="batch",
                                  progress=progress):
            out.append(model.encode_image(batch.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def text_features(encoder: Encoder, texts: Sequence[str], *, batch_size: int = 256, device=None) -> np.ndarray:
    import torch

    model = encoder.flip.model
    device = device or next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out.append(model.encode_text(encoder.flip.tokenizer(list(texts[i:i + batch_size])).to(device))
                       .float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _majority_row(bench: AttributeBenchmark) -> dict[str, Any]:
    train, test = bench.indices("train"), bench.indices("test")
    majority = bench.labels[train].mean(axis=0) >= 0.5
    correct = (bench.labels[test] == majority).astype(float)
    acc = correct.mean(axis=0)
    balanced = [balanced_accuracy(correct[:, i], bench.labels[test, i]) for i in range(len(bench.attributes))]
    return {"mean_accuracy": float(acc.mean()), "mean_balanced_accuracy": float(np.mean(balanced)),
            "attributes": {a: {"accuracy": float(acc[i]), "balanced_accuracy": balanced[i]}
                           for i, a in enumerate(bench.attributes)}}


def run_benchmark(bench: AttributeBenchmark | RetrievalBenchmark, encoders: Sequence[Encoder], *,
                  batch_size: int = 64, workers: int = 0, device: str = "auto", threads: int | None = None,
                  l2: Sequence[float] = ATTRIBUTE_L2, ks: Sequence[int] = DEFAULT_KS,
                  progress: bool = False) -> dict[str, Any]:
    import torch

    from facedata.flip.embed import resolve_device

    t0 = time.perf_counter()
    dev = resolve_device(device, "--device")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    results: dict[str, Any] = {"benchmark": bench.name, "data": str(bench.root), "notes": list(bench.notes),
                               "device": str(dev), "rows": []}
    try:
        if isinstance(bench, AttributeBenchmark):
            results.update(counts=bench.counts(), attributes=bench.attributes)
            tr, va, te = (bench.indices(s) for s in ("train", "validation", "test"))
            majority = _majority_row(bench)
            results["rows"].append({"model": "majority class (train)", "kind": "labels only", "source": "",
                                    "mean_accuracy": majority["mean_accuracy"],
                                    "mean_balanced_accuracy": majority["mean_balanced_accuracy"],
                                    "attributes": majority["attributes"]})
        else:
            counts = bench.captions_per_image()
            results.update(n_images=len(bench.images), n_captions=len(bench.captions),
                           captions_per_image={"min": int(counts.min()), "max": int(counts.max())},
                           chance={f"t2i_R@{k}": min(1.0, k / len(bench.images)) for k in ks})
        for enc in encoders:
            was = (enc.flip.model.training, next(enc.flip.model.parameters()).device)
            enc.flip.model.to(dev).eval()
            try:
                feats = image_features(enc, bench.images, batch_size=batch_size, workers=workers, device=dev,
                                       progress=progress)
                if isinstance(bench, RetrievalBenchmark):
                    texts = text_features(enc, bench.captions, device=dev)
            finally:
                enc.flip.model.to(was[1]).train(was[0])
            row: dict[str, Any] = {"model": enc.label, "kind": enc.kind, "source": enc.source}
            if isinstance(bench, AttributeBenchmark):
                res = attribute_probe(feats[tr], bench.labels[tr], feats[va], bench.labels[va], feats[te],
                                      bench.labels[te], names=bench.attributes, l2=l2)
                row.update({k: res[k] for k in ("n_train", "n_val", "n_test", "mean_accuracy",
                                                "mean_balanced_accuracy", "l2_selection")},
                           attributes=res["attributes"])
            else:
                res = multi_caption_recall(feats, texts, bench.caption_image, ks)
                row.update({f"i2t_R@{k}": res["image_to_text"][f"R@{k}"] for k in ks})
                row.update({f"t2i_R@{k}": res["text_to_image"][f"R@{k}"] for k in ks})
                row["mean"] = res["mean"]
            results["rows"].append(row)
    finally:
        torch.set_num_threads(old_threads)
    results["wall_s"] = round(time.perf_counter() - t0, 2)
    return results


# ---------------------------------------------------------------------------------------------
# Tables


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.2f}"
    return str(v)


def _columns(results: dict[str, Any]) -> list[str]:
    if results["benchmark"] in ("celeba-attr", "lfwa-attr"):
        return ["mean_accuracy", "mean_balanced_accuracy"]
    return [c for c in RETRIEVAL_COLUMNS if any(c in r for r in results["rows"])]


def format_markdown(results: dict[str, Any]) -> str:
    """The side-by-side table (figures in percent), with the data it was measured on."""
    cols = _columns(results)
    lines = [f"### {results['benchmark']} on {results['data']}", ""]
    if "counts" in results:
        c = results["counts"]
        lines.append(f"{c['train']} train / {c['validation']} validation / {c['test']} test images, "
                     f"{len(results['attributes'])} attributes; linear probe per attribute on frozen image "
                     "features (L2 chosen on validation), test accuracy in %.")
    else:
        lines.append(f"{results['n_images']} images, {results['n_captions']} captions "
                     f"({results['captions_per_image']['min']}-{results['captions_per_image']['max']} per image); "
                     "recall in %; image->text counts an image found when any of its captions ranks within k.")
    for note in results.get("notes", []):
        lines.append(f"Note: {note}.")
    lines += ["", "| model | kind | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['kind']} | " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    if "chance" in results:
        lines.append("")
        lines.append("Chance text->image: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in results["chance"].items()))
    return "\n".join(lines) + "\n"


def write_tables(results: dict[str, Any], out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    from facedata.core.shards import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "csv": out / "table.csv", "markdown": out / "table.md"}
    write_json(files["json"], results)
    cols = _columns(results)
    extra = ["n_train", "n_val", "n_test"] if "counts" in results else []
    with open(files["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["benchmark", "model", "kind", "source", *extra, *cols])
        for r in results["rows"]:
            w.writerow([results["benchmark"], r["model"], r["kind"], r["source"], *(r.get(c, "") for c in extra),
                        *("" if r.get(c) is None else f"{r[c]:.6f}" for c in cols)])
    files["markdown"].write_text(format_markdown(results), encoding="utf-8")
    if "attributes" in results:
        files["per_attribute"] = out / "per_attribute.csv"
        with open(files["per_attribute"], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["attribute", *(r["model"] for r in results["rows"])])
            for a in results["attributes"]:
                w.writerow([a, *(f"{r['attributes'][a]['accuracy']:.6f}" for r in results["rows"])])
    if plot:
        files["plot"] = _plot(results, cols, out / "table.png")
    return files


def _plot(results: dict[str, Any], cols: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cols) * len(rows) / 2 + 3), 4))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(cols))
    for i, r in enumerate(rows):
        ax.bar(x + i * width, [100 * (r.get(c) or 0.0) for c in cols], width, label=r["model"])
    ax.set_xticks(x + width * (len(rows) - 1) / 2, cols)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['benchmark']}: {Path(results['data']).name}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
