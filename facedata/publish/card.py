"""The dataset card: DEST/README.md with Hugging Face front matter, and its pictures under DEST/card/.

`write_dataset_card` turns what a run knows about itself (summary.json, the run config, the release
manifest, the published records and a few example images) into a card that explains the dataset
without opening it: what a sample is, how it was made, the filtering funnel with the reason for
every drop, the identity-disjoint splits, distributions as plots, caption statistics, every
model with its licence (non-commercial ones flagged at the top), the exact config, the code
version and manifest fingerprint, how to load it, and its limitations.

The front matter follows the Hub's dataset card metadata (pretty_name, license, language,
task_categories, tags, size_categories, configs with data_files per split, and dataset_info when
the manifest gives the published features). The images' licences are their owners': the card
says so under `license: other`.

Every file is written atomically (temporary name, then rename); README.md last, so a reader never
sees a card that points at a picture not yet written. PNGs in card/ that the new card no longer
references are removed. Plots use matplotlib's Agg renderer through `Figure` directly (no pyplot,
no display, no global state); a plot whose column is all null is skipped.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from facedata.core import markdown
from facedata.attributes.thresholds import load_calibration
from facedata.attributes.vocabulary import ATTRIBUTES
from facedata.core.schema import field_descriptions, reasons
from facedata.core.shards import atomic_path

__all__ = [
    "CARD_DIR",
    "card_images",
    "card_metadata",
    "measurements",
    "non_commercial_models",
    "size_category",
    "write_dataset_card",
]

CARD_DIR = "card"
README = "README.md"
SPLIT_ORDER = ("train", "validation", "test")

# The Hub's size buckets (datasets/utils/resources/size_categories.json), upper bound exclusive.
_SIZE_BUCKETS = [
    (1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T"),
]

TASK_CATEGORIES = ["image-to-text", "text-to-image", "zero-shot-image-classification"]
TAGS = ["faces", "image-text", "captions", "face-attributes", "webdataset"]
LICENSE_NAME = "web-images-owner-licences"
_NON_COMMERCIAL = re.compile(r"non[- ]?commercial|research[- ]only|\bnc\b|cc-by-nc", re.IGNORECASE)

# Why a sample was dropped, by status ({a.b.c} is filled from the run config), and what each
# published column holds (columns absent from a release are not listed): both from facedata.core.schema.
REASONS = reasons()
FIELDS = field_descriptions()


# --------------------------------------------------------------------------------------------
# Small helpers


def size_category(n: int) -> str:
    """The Hub's size_categories bucket for `n` examples ('n<1K', '1K<n<10K', ...)."""
    for bound, label in _SIZE_BUCKETS:
        if n < bound:
            return label
    return "n>1T"


def _get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _fill(template: str, config: dict) -> str:
    return re.sub(r"\{([a-z_.]+)\}", lambda m: _fmt(_get(config, m.group(1), "?")), template)


def reason(status: str, config: dict, declared: dict | None = None) -> str:
    """One phrase saying why a sample with this status was dropped (`declared`: what a user's steps
    say their statuses mean)."""
    if status.startswith("http_"):
        return f"the server answered HTTP {status[5:]}"
    return _fill(REASONS.get(status) or (declared or {}).get(status) or status.replace("_", " "), config)


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _plural(n: Any, word: str, plural: str | None = None) -> str:
    """'1 image', '4 images' (n formatted with thousands separators)."""
    return f"{_fmt(n)} {word if n == 1 else (plural or word + 's')}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table of values shown as the card shows them (_fmt)."""
    return markdown.table(header, ([c if isinstance(c, str) else _fmt(c) for c in row] for row in rows))


def _sequence(value: Any) -> list:
    """A list from a parquet list cell (list, tuple or numpy array); [] for null."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, np.ndarray):
        return list(value)
    return []


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _label(value: Any) -> Any:
    """A categorical value, or None for null/NaN/NA."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _plain(obj: Any) -> Any:
    """`obj` as plain JSON types (numpy scalars to Python, paths and the like to strings), so YAML
    can write it whatever the caller passed (a pydantic model_dump, numpy counts)."""
    def default(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        return str(value)

    return json.loads(json.dumps(obj, default=default))


def _split_sort_key(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


# --------------------------------------------------------------------------------------------
# Reading the inputs


def _primary(row_faces: list, primary: Any) -> dict | None:
    if not row_faces:
        return None
    index = _number(primary)
    if index is not None and 0 <= int(index) < len(row_faces):
        return row_faces[int(index)]
    return next((f for f in row_faces if isinstance(f, dict) and f.get("primary")), row_faces[0])


def _primary_attributes(described: list, primary: Any) -> dict:
    """The attribute values of the primary face (the described face whose index is `primary`, else the first)."""
    if not described:
        return {}
    index = _number(primary)
    entry = next((d for d in described if isinstance(d, dict) and index is not None and d.get("face") == int(index)),
                 described[0])
    values = entry.get("values") if isinstance(entry, dict) else None
    return values if isinstance(values, dict) else {}


def _words(text: Any) -> float | None:
    return float(len(text.split())) if isinstance(text, str) and text.strip() else None


def measurements(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per sample with the plotted quantities: width, height, short_side, n_faces,
    face_side (primary face's shorter side, px), face_area_ratio, age, gender, expression,
    caption_words (face caption) and web_caption_words. Flat columns of `samples` with these
    names win (what facedata.publish.writer passes); otherwise they are read from the records' nested
    `faces` / `face_attributes` columns and caption texts. A quantity the samples do not have is
    all null."""
    n = len(samples)
    column = lambda name: samples[name].tolist() if name in samples.columns else [None] * n  # noqa: E731
    out = pd.DataFrame(index=range(n))
    out["width"] = [_number(v) for v in column("width")]
    out["height"] = [_number(v) for v in column("height")]
    out["short_side"] = [min(w, h) if w is not None and h is not None and not (math.isnan(w) or math.isnan(h))
                         else None for w, h in zip(out["width"], out["height"])]
    faces = [_sequence(v) for v in column("faces")]
    primaries = column("primary_face")
    if "n_faces" in samples.columns:
        out["n_faces"] = [_number(v) for v in column("n_faces")]
    else:
        out["n_faces"] = [float(len(f)) if "faces" in samples.columns else None for f in faces]
    primary_faces = [_primary(f, p) for f, p in zip(faces, primaries)]
    for name, key in (("face_side", "side"), ("face_area_ratio", "area_ratio")):
        if name in samples.columns:
            out[name] = [_number(v) for v in column(name)]
        else:
            out[name] = [_number(f.get(key)) if isinstance(f, dict) else None for f in primary_faces]
    described = [_primary_attributes(_sequence(v), p) for v, p in zip(column("face_attributes"), primaries)]
    for name in ("age", "gender", "expression"):
        if name in samples.columns:
            values = column(name)
        else:
            values = [d.get(name) for d in described]
        out[name] = [_number(v) for v in values] if name == "age" else [_label(v) for v in values]
    for name, text_column in (("caption_words", "face_caption"), ("web_caption_words", "caption")):
        if name in samples.columns:
            out[name] = [_number(v) for v in column(name)]
        else:
            out[name] = [_words(v) for v in column(text_column)]
    return out


def _manifest_files(manifest: dict) -> list[dict]:
    """The manifest's files as dicts with at least 'path', whatever shape the manifest uses
    (a list of dicts or of paths, or a dict path -> info)."""
    files = manifest.get("files") or []
    if isinstance(files, dict):
        files = [{"path": path, **(info if isinstance(info, dict) else {})} for path, info in files.items()]
    result = []
    for item in files:
        if isinstance(item, str):
            result.append({"path": item})
        elif isinstance(item, dict) and item.get("path"):
            result.append(dict(item))
    return result


def _file_split(info: dict) -> str | None:
    if info.get("split"):
        return str(info["split"])
    match = re.search(r"(?:^|/)(train|validation|test)(?=[-_./])", info["path"])
    return match.group(1) if match else None


def _first(mapping: dict, *keys: str) -> Any:
    for key in keys:
        if mapping.get(key) is not None:
            return mapping[key]
    return None


def _split_counts(summary: dict, manifest: dict, samples: pd.DataFrame) -> dict[str, dict]:
    """Per split: images (exact when the manifest or summary gives it), identities (when known)."""
    counts: dict[str, dict] = {}
    for split, info in (manifest.get("splits") or {}).items():
        info = info if isinstance(info, dict) else {"num_examples": info}
        images = _first(info, "num_examples", "num_rows", "rows", "n_samples", "images")
        counts[split] = {"images": images, "identities": _first(info, "identities", "n_identities"),
                         "exact": images is not None, "num_bytes": _first(info, "num_bytes", "bytes")}
    identity = _stage(summary, "identity") or {}
    for split, info in (identity.get("splits") or {}).items():
        entry = counts.setdefault(split, {"images": None, "identities": None, "exact": False})
        if entry["images"] is None:
            entry["images"] = info.get("images")
        if entry["identities"] is None:
            entry["identities"] = info.get("identities")
    if "split" in samples.columns and samples["split"].notna().any():
        sample_counts = samples["split"].dropna().astype(str).value_counts()
        sample_ids = (samples.dropna(subset=["split", "identity_id"]).groupby("split")["identity_id"].nunique()
                      if "identity_id" in samples.columns else pd.Series(dtype=int))
        for split, count in sample_counts.items():
            entry = counts.setdefault(split, {"images": None, "identities": None, "exact": False})
            if entry["images"] is None:
                entry["images"] = int(count)
            if entry["identities"] is None and split in sample_ids.index:
                entry["identities"] = int(sample_ids[split])
    for info in _manifest_files(manifest):
        split = _file_split(info)
        if split:
            counts.setdefault(split, {"images": None, "identities": None, "exact": False})
    return dict(sorted(counts.items(), key=lambda kv: _split_sort_key(kv[0])))


def _data_pattern(split: str, manifest: dict) -> str:
    """The data_files glob of a split: the manifest's own, else data/<split>-* (narrowed to
    *.parquet when other files in that folder would match it too)."""
    given = manifest.get("data_files")
    if isinstance(given, dict) and given.get(split):
        return given[split]
    files = [f["path"] for f in _manifest_files(manifest)]
    parquet = [p for p in files if p.endswith(".parquet") and _file_split({"path": p}) == split]
    folder = posixpath.dirname(parquet[0]) if parquet else "data"
    pattern = f"{folder}/{split}-*" if folder else f"{split}-*"
    if any(fnmatch.fnmatch(p, pattern) and not p.endswith(".parquet") for p in files):
        pattern += ".parquet"
    return pattern


def _stage(summary: dict, name: str) -> dict | None:
    return next((s for s in summary.get("funnel") or [] if s.get("stage") == name), None)


def _models(summary: dict, manifest: dict) -> list[dict]:
    """Every model with its role: the face detector and embedder, then the attribute models."""
    rows: list[dict] = []
    seen: set[tuple] = set()

    def add(role: str, info: Any) -> None:
        if not isinstance(info, dict):
            return
        key = (info.get("name"), info.get("version"))
        if key in seen:
            return
        seen.add(key)
        rows.append({"role": role, "name": info.get("name") or "?", "version": info.get("version") or "?",
                     "licence": info.get("licence") or info.get("license") or "unknown",
                     "source": info.get("source") or "?"})

    for role, info in (summary.get("models") or {}).items():
        add({"detector": "face detector", "embedder": "face embedder"}.get(role, role), info)
    for info in (summary.get("attribute_models") or {}).values():
        add("attributes", info)
    extra = manifest.get("models") or {}
    for role, info in (extra.items() if isinstance(extra, dict) else enumerate(extra)):
        add(role if isinstance(role, str) else "model", info)
    return rows


def non_commercial_models(summary: dict, manifest: dict | None = None) -> list[dict]:
    """The models whose licence restricts use to non-commercial research."""
    return [m for m in _models(summary, manifest or {}) if _NON_COMMERCIAL.search(m["licence"])]


def _code_version(manifest: dict, summary: dict) -> str:
    value = _first(manifest, "code_version", "facedata_version", "git_commit", "version")
    if value is None:
        value = _first(summary, "code_version", "facedata_version")
    return str(value) if value is not None else "not recorded"


def _fingerprint(manifest: dict) -> tuple[str, bool]:
    """The manifest's fingerprint, or (when it has none) a SHA-256 of its canonical JSON; and whether it was given."""
    value = _first(manifest, "fingerprint", "manifest_fingerprint", "sha256")
    if value is not None:
        return str(value), True
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest(), False


def _total(summary: dict, manifest: dict, samples: pd.DataFrame) -> int:
    splits = _split_counts(summary, manifest, samples)
    if splits and all(s["exact"] for s in splits.values()):
        return int(sum(s["images"] for s in splits.values()))
    given = _first(manifest, "num_examples", "num_rows", "n_samples")
    if given is not None:
        return int(given)
    if summary.get("n_ok") is not None:
        return int(summary["n_ok"])
    return len(samples)


def _thresholds(config: dict, summary: dict | None = None) -> dict[str, float]:
    """Confidence each attribute needed to be stated: as the caption step recorded applying it (its
    stats), else as it would from the config. Keys "name=value" mark values never stated."""
    if (summary or {}).get("attribute_thresholds") is not None:
        return summary["attribute_thresholds"]
    from facedata.attributes.thresholds import thresholds
    from facedata.core.config import AttributeConfig

    return thresholds(AttributeConfig.model_validate(config.get("attributes") or {}))


def _reliability_section(summary: dict, config: dict) -> list[str]:
    """How often each stated attribute was right on labelled real faces, at the threshold applied."""
    applied = _thresholds(config, summary)
    measured = load_calibration()
    if not measured.get("attributes"):
        return []
    lines = ["## How often the attributes are right", "",
             f"Measured on {measured.get('n_faces', '?')} labelled real faces in {measured.get('n_images', '?')} "
             f"images ({measured.get('labels', 'labelled photos')}) with the models above: for each attribute "
             "the share of its statements that were right (precision) and of the faces where it was stated "
             "(coverage), at the threshold this dataset applied. An attribute whose statements were not right at "
             f"least {_fmt(measured.get('target_precision', 0.9))} of the time at any threshold is not stated "
             "unless the config asked for it.", ""]
    rows = []
    for name, entry in measured["attributes"].items():
        threshold = applied.get(name)
        calibrated = entry.get("threshold")
        if threshold is None:
            rows.append([name, entry.get("n", "?"), "not stated", f"{_fmt(entry.get('precision'))} at best", "-"])
        elif calibrated is not None and abs(threshold - calibrated) < 1e-9:
            rows.append([name, entry["n"], threshold, entry.get("precision"), entry.get("coverage")])
        else:
            rows.append([name, entry.get("n", "?"), f"{_fmt(threshold)} (set by the config)",
                         "not measured at this threshold", "-"])
    lines += _table(["attribute", "labelled faces", "threshold applied", "precision", "coverage"], rows)
    never = sorted(k.replace("=", " ") for k, v in applied.items() if "=" in k)
    if never:
        lines += ["", "Never stated (too few labelled faces show them to measure): " + ", ".join(never) + "."]
    return lines + [""]


# --------------------------------------------------------------------------------------------
# Front matter


def card_metadata(name: str, summary: dict, config: dict, manifest: dict, samples: pd.DataFrame) -> dict:
    """The README's YAML front matter as a dict (Hub dataset card metadata)."""
    total = _total(summary, manifest, samples)
    splits = _split_counts(summary, manifest, samples) or {"train": {"images": total, "exact": False}}
    flagged = non_commercial_models(summary, manifest)
    details = ("Images are web images collected from their URLs; each image remains under its owner's "
               "licence and copyright, which this dataset does not change or grant. Face captions, "
               "attributes, boxes and identity clusters were produced with the models listed in the card. "
               + ("Some of them (" + ", ".join(f"{m['name']}: {m['licence']}" for m in flagged)
                  + ") are licensed for non-commercial research only. " if flagged else "")
               + "See the Licence section of the card.")
    meta: dict[str, Any] = {
        "pretty_name": _pretty_name(name, manifest),
        "license": "other",
        "license_name": LICENSE_NAME,
        "license_details": details,
        "language": ["en"],
        "multilinguality": "monolingual",
        "annotations_creators": ["machine-generated"],
        "language_creators": ["found", "machine-generated"],
        "source_datasets": ["original"],
        "task_categories": list(TASK_CATEGORIES),
        "tags": list(TAGS),
        "size_categories": [size_category(total)],
        "configs": [{
            "config_name": "default",
            "data_files": [{"split": split, "path": _data_pattern(split, manifest)} for split in splits],
        }],
    }
    features = manifest.get("features")
    if features:
        meta["dataset_info"] = _dataset_info(features, splits, manifest)
    return meta


def _dataset_info(features: Any, splits: dict[str, dict], manifest: dict) -> dict:
    """dataset_info for the front matter: the manifest's features, and the splits when every split's
    example count is exact (`datasets` checks it against the files) and its size is known (the
    split's num_bytes in the manifest, else the size of its parquet files)."""
    info: dict[str, Any] = {"features": features}
    files = _manifest_files(manifest)
    parquet = [f for f in files if f["path"].endswith(".parquet")]

    def size(split: str, entry: dict) -> int | None:
        if entry.get("num_bytes") is not None:
            return int(entry["num_bytes"])
        own = [f for f in parquet if _file_split(f) == split]
        sizes = [_first(f, "bytes", "size", "num_bytes") for f in own]
        return int(sum(sizes)) if own and all(v is not None for v in sizes) else None

    rows = [{"name": s, "num_bytes": size(s, v), "num_examples": int(v["images"])}
            for s, v in splits.items() if v.get("exact")]
    if rows and len(rows) == len(splits) and all(r["num_bytes"] is not None for r in rows):
        info["splits"] = rows
        info["dataset_size"] = sum(r["num_bytes"] for r in rows)
    sizes = [_first(f, "bytes", "size", "num_bytes") for f in parquet]
    if parquet and all(v is not None for v in sizes):
        info["download_size"] = int(sum(sizes))
    return info


def _pretty_name(name: str, manifest: dict) -> str:
    return str(manifest.get("pretty_name") or name.rsplit("/", 1)[-1])


def _repo_id(name: str, manifest: dict, repo_id: str | None) -> str:
    return repo_id or manifest.get("repo_id") or (name if "/" in name else f"YOUR_USER/{name}")


# --------------------------------------------------------------------------------------------
# Plots


def _figure(width: float = 6.4, height: float = 3.6, ncols: int = 1):
    from matplotlib.figure import Figure  # Agg through Figure.savefig: no pyplot, no display

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, (list(axes) if ncols > 1 else [axes])


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _present(values: pd.Series) -> pd.Series:
    return values.dropna()


def _integer_counts(ax, axis: str = "y") -> None:
    from matplotlib.ticker import MaxNLocator

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_locator(MaxNLocator(integer=True))


def _bars(ax, labels: list[str], counts: list[int], colours: list[str] | None = None) -> None:
    positions = list(range(len(labels)))
    bars = ax.bar(positions, counts, color=colours or "#4c72b0")
    long = max(map(len, labels), default=0) > 6
    ax.set_xticks(positions, labels, rotation=30 if long else 0, ha="right" if long else "center")
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("samples")
    _integer_counts(ax)


def _plot_funnel(summary: dict, path: Path) -> Path | None:
    funnel = summary.get("funnel") or []
    if not funnel:
        return None
    fig, (ax,) = _figure(6.4, 0.5 + 0.45 * len(funnel))
    names = [s.get("stage", "?") for s in funnel][::-1]
    kept = [s.get("kept", 0) for s in funnel][::-1]
    bars = ax.barh(names, kept, color="#55a868")
    ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_xlabel("samples kept after the stage")
    _integer_counts(ax, "x")
    ax.set_xlim(0, max(kept + [1]) * 1.15)
    return _save(fig, path)


def _plot_resolution(m: pd.DataFrame, path: Path) -> Path | None:
    both = m[["width", "height"]].dropna()
    if both.empty:
        return None
    fig, (ax1, ax2) = _figure(9, 3.6, ncols=2)
    if len(both) > 5000:
        hist = ax1.hist2d(both["width"], both["height"], bins=60, cmap="viridis", cmin=1)
        fig.colorbar(hist[3], ax=ax1, label="images")
    else:
        ax1.scatter(both["width"], both["height"], s=10, alpha=0.6)
    ax1.set_xlabel("width (px)")
    ax1.set_ylabel("height (px)")
    ax1.set_title("stored image size")
    ax2.hist(m["short_side"].dropna(), bins=30, color="#4c72b0")
    ax2.set_xlabel("shorter side (px)")
    ax2.set_ylabel("images")
    _integer_counts(ax2)
    ax2.set_title("shorter side")
    return _save(fig, path)


def _plot_faces_per_image(m: pd.DataFrame, path: Path) -> Path | None:
    values = _present(m["n_faces"])
    if values.empty:
        return None
    counts = Counter(int(v) for v in values)
    labels = list(range(min(counts), max(counts) + 1))
    fig, (ax,) = _figure()
    _bars(ax, [str(v) for v in labels], [counts.get(v, 0) for v in labels])
    ax.set_xlabel("faces detected per image")
    return _save(fig, path)


def _plot_face_size(m: pd.DataFrame, path: Path) -> Path | None:
    side, ratio = _present(m["face_side"]), _present(m["face_area_ratio"])
    if side.empty and ratio.empty:
        return None
    panels = [(side, "primary face, shorter side (px)"), (ratio, "primary face area / image area")]
    panels = [p for p in panels if not p[0].empty]
    fig, axes = _figure(4.6 * len(panels), 3.6, ncols=len(panels))
    for ax, (values, label) in zip(axes, panels):
        ax.hist(values, bins=30, color="#8172b2")
        ax.set_xlabel(label)
        ax.set_ylabel("images")
        _integer_counts(ax)
    return _save(fig, path)


def _plot_age(m: pd.DataFrame, path: Path) -> Path | None:
    ages = _present(m["age"])
    if ages.empty:
        return None
    fig, (ax,) = _figure()
    top = max(80, int(math.ceil(ages.max() / 5.0)) * 5)
    ax.hist(ages, bins=list(range(0, top + 5, 5)), color="#dd8452")
    ax.set_xlabel("estimated age of the primary face (years, model prediction)")
    ax.set_ylabel("images")
    _integer_counts(ax)
    return _save(fig, path)


def _plot_category(m: pd.DataFrame, column: str, vocabulary: Sequence[str], xlabel: str, path: Path) -> Path | None:
    values = m[column]
    present = _present(values)
    if present.empty:
        return None
    counts = Counter(str(v) for v in present)
    labels = [v for v in vocabulary if v in counts] + sorted(set(counts) - set(vocabulary))
    heights = [counts[v] for v in labels]
    colours = ["#4c72b0"] * len(labels)
    missing = int(values.isna().sum())
    if missing:
        labels.append("no confident label")
        heights.append(missing)
        colours.append("#bbbbbb")
    fig, (ax,) = _figure()
    _bars(ax, labels, heights, colours)
    ax.set_xlabel(xlabel)
    return _save(fig, path)


def _plot_caption_length(m: pd.DataFrame, path: Path) -> Path | None:
    face, web = _present(m["caption_words"]), _present(m["web_caption_words"])
    if face.empty and web.empty:
        return None
    fig, (ax,) = _figure()
    top = int(max(list(face) + list(web)))
    bins = list(range(0, top + 2, max(1, (top + 1) // 30 or 1)))
    if not face.empty:
        ax.hist(face, bins=bins, alpha=0.75, label="face caption", color="#4c72b0")
    if not web.empty:
        ax.hist(web, bins=bins, alpha=0.55, label="web caption", color="#c44e52")
    ax.set_xlabel("caption length (words)")
    ax.set_ylabel("samples")
    _integer_counts(ax)
    ax.legend()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# The body


def _description(total: int, summary: dict) -> str:
    """The opening paragraph: what a sample holds, by the stages the run had."""
    stages = {s.get("stage") for s in summary.get("funnel") or []}
    has = []
    if "captions" in stages or summary.get("caption_stats"):
        has.append("a machine-written English **face caption** composed from attribute predictions (age, gender, "
                   "expression, hair, accessories, pose, image quality) for its faces")
    if "faces" in stages:
        has.append("face boxes, 5-point landmarks, pose and sharpness")
    if "identity" in stages:
        has.append("an identity cluster and an identity-disjoint train/validation/test split")
    listed = "; ".join(has[:-1]) + ("; and " if len(has) > 1 else "") + has[-1] if has else ""
    return (f"{_plural(total, 'web image')} of people, each with its original web caption"
            + (f", plus: {listed}" if listed else "") + ". It was built with `facedata`, in the manner of "
            "FaceCaption-15M, for face-centred image-text learning: contrastive pre-training, text-to-image "
            "retrieval, captioning, zero-shot attribute classification.")


def _stage_text(stage: dict, config: dict, summary: dict) -> str:
    """One paragraph saying what a funnel stage did, with the config values that matter."""
    name = stage.get("stage")
    get = lambda key, default=None: _get(config, key, default)  # noqa: E731
    if name == "input":
        dedupe = "repeated URLs dropped" if get("input.dedupe_urls", True) else "repeated URLs kept"
        return (f"**input**: a list of image URLs with their web captions (format "
                f"`{get('input.format', '?')}`, URL column `{get('input.url_col', 'url')}`, caption column "
                f"`{get('input.caption_col', 'caption')}`); {dedupe}.")
    if name == "download":
        optout = ("sites sending `X-Robots-Tag: noai` or `noimageai` were respected (image dropped)"
                  if get("download.respect_optout", True) else "site opt-out headers were NOT checked")
        resize = get("image.resize_max_side")
        return (f"**download**: each URL fetched once (timeout {_fmt(get('download.timeout'))} s, "
                f"{_plural(get('download.retries'), 'retry', 'retries')}, at most {_fmt(get('download.max_bytes'))} bytes); "
                f"{optout}. Images were checked by magic bytes, decoded with EXIF orientation applied, "
                f"and kept when the shorter side is at least {_fmt(get('image.min_side'))} px and the aspect "
                f"ratio at most {_fmt(get('image.max_aspect'))}"
                + (f"; larger images were resized to at most {_fmt(resize)} px on the longer side"
                   if resize else "")
                + f" (re-encode: {_fmt(get('image.reencode'))}).")
    if name == "faces":
        models = summary.get("models") or {}
        detector = (models.get("detector") or {}).get("name", "a face detector")
        embedder = (models.get("embedder") or {}).get("name", "a face embedder")
        return (f"**faces**: {detector} found faces (score at least {_fmt(get('faces.filter.min_score'))}, "
                f"detection size {_fmt(get('faces.det_size'))}); an image was kept with "
                f"{_fmt(get('faces.filter.min_faces'))} to {_fmt(get('faces.filter.max_faces'))} faces whose "
                f"primary face is at least {_fmt(get('faces.filter.min_face_side'))} px on its shorter side and "
                f"turned at most {_fmt(get('faces.filter.max_abs_yaw'))} degrees. Each face got a box, 5 "
                f"keypoints, pose and sharpness; faces at least the minimum size were embedded with {embedder}.")
    if name == "identity":
        return (f"**identity**: faces matching the opt-out gallery (cosine at least "
                f"{_fmt(get('identity.optout_threshold'))}) removed their whole image; the rest were clustered "
                f"into identities ({_fmt(get('identity.method'))} over a {_fmt(get('identity.k'))}-NN graph, "
                f"similarity threshold {_fmt(get('identity.threshold'))}); near-duplicate shots of one face "
                f"(cosine at least {_fmt(get('identity.near_duplicate_threshold'))}) kept only the best image"
                + (", identity outliers were dropped" if get("identity.drop_outliers") else "")
                + (", singleton identities were dropped" if get("identity.drop_singletons") else "")
                + (f", at most {_fmt(get('identity.max_images_per_identity'))} images per identity were kept"
                   if get("identity.max_images_per_identity") else "")
                + f". Then the images were split by identity (validation "
                  f"{_fmt(get('identity.validation_fraction'))}, test {_fmt(get('identity.test_fraction'))} of "
                  f"the images, seed {_fmt(get('identity.seed'))}).")
    if name == "captions":
        predictors = ", ".join(get("attributes.predictors") or []) or "the configured predictors"
        rewriter = get("captions.rewriter_model")
        return (f"**captions**: attribute models ({predictors}) described up to "
                f"{_fmt(get('attributes.max_faces'))} faces per image, primary first. A prediction was kept only "
                f"when its confidence reached the threshold (default {_fmt(get('attributes.min_confidence'))}); "
                f"otherwise the attribute is null, never guessed. A seeded grammar (seed "
                f"{_fmt(get('captions.seed'))}) composed an English face caption from the confident attributes "
                + (f"and `{rewriter}` rewrote it, a rewrite being kept only when it states exactly the same values "
                   "and adds no name." if rewriter else "(no language-model rewrite).")
                + (f" Images with fewer than {_fmt(get('attributes.min_valid_labels'))} confident labels on the "
                   "primary face were dropped." if get("attributes.min_valid_labels") else ""))
    return f"**{name}**."


def _funnel_section(summary: dict, config: dict, funnel_png: Path | None) -> list[str]:
    funnel = summary.get("funnel") or []
    if not funnel:
        return ["## Filtering funnel", "", "The run recorded no funnel."]
    start = funnel[0].get("kept", 0) or 0
    rows, why = [], []
    for stage in funnel:
        kept = stage.get("kept", 0) or 0
        dropped = stage.get("dropped", 0) or 0
        before = kept + dropped
        by_status = stage.get("dropped_by_status") or {}
        ordered = sorted(by_status.items(), key=lambda kv: (-kv[1], kv[0]))
        rows.append([stage.get("stage", "?"), kept, dropped, _pct(kept, start), _pct(dropped, before) if dropped else "0.0%",
                     ", ".join(f"{s} {n}" for s, n in ordered) or "-"])
        why += [[stage.get("stage", "?"), f"`{s}`", n, _pct(n, start), reason(s, config, stage.get("reasons"))]
                for s, n in ordered]
    lines = ["## Filtering funnel", "",
             f"Of {start:,} input rows, {funnel[-1].get('kept', 0):,} ({_pct(funnel[-1].get('kept', 0), start)}) "
             "were published. Each stage keeps or drops a sample with exactly one status, the first reason found; "
             "\"kept share\" is of the input, \"dropped share\" of what entered the stage.", ""]
    lines += _table(["stage", "kept", "dropped", "kept share of input", "dropped share at stage", "dropped by status"], rows)
    if funnel_png:
        lines += ["", f"![Samples kept after each stage]({CARD_DIR}/{funnel_png.name})"]
    if why:
        lines += ["", "Why samples were dropped:", ""]
        lines += _table(["stage", "status", "samples", "share of input", "why"], why)
    return lines


def _splits_section(summary: dict, manifest: dict, samples: pd.DataFrame) -> list[str]:
    splits = _split_counts(summary, manifest, samples)
    lines = ["## Splits", ""]
    if not splits:
        return lines + ["The release has one split, `train`; the identity stage did not run, so no identity-disjoint "
                        "split was made."]
    total = sum(s["images"] or 0 for s in splits.values())
    rows = [[f"`{name}`", s["images"] if s["images"] is not None else "?",
             s["identities"] if s["identities"] is not None else "?",
             _pct(s["images"] or 0, total), f"`{_data_pattern(name, manifest)}`"] for name, s in splits.items()]
    lines += ["The splits are **identity-disjoint**: whole identity clusters (by the primary face) were dealt to test "
              "and validation until each held its share of the images, the rest went to train, so no primary-face "
              "identity appears in two splits. A secondary face in a group photo may still belong to an identity "
              "of another split, and clusters are estimates: two clusters can hold one person.", ""]
    lines += _table(["split", "images", "identities", "share of images", "data files"], rows)
    identity = _stage(summary, "identity")
    if identity:
        lines += ["", f"{_plural(identity.get('n_identities'), 'identity', 'identities')} in all, the largest "
                      f"with {_plural(identity.get('largest_identity'), 'image')}; "
                      f"{_plural(identity.get('n_singletons'), 'singleton')}."]
    return lines


def _fields_section(samples: pd.DataFrame, manifest: dict) -> list[str]:
    names = list(samples.columns)
    features = manifest.get("features")
    if isinstance(features, list):
        names = [f.get("name") for f in features if isinstance(f, dict) and f.get("name")]
    elif isinstance(features, dict):
        names = list(features)
    if not names:
        return []
    rows = [[f"`{n}`", FIELDS.get(n, "")] for n in names]
    where = ("`face_attributes`" if "face_attributes" in names
             else "each face's `attributes` (in `faces`)" if "faces" in names else "the attribute columns")
    lines = ["## Fields", "", f"One row per image (a sample). The attribute values in {where} are:", ""]
    lines += [", ".join(f"`{a}` ({spec.kind}{': ' + ' / '.join(spec.values) if spec.values else ''})"
                        for a, spec in ATTRIBUTES.items()), ""]
    return lines + _table(["column", "what it holds"], rows) + _url_credentials_note(manifest)


def _url_credentials_note(manifest: dict) -> list[str]:
    """What publish did to credentials in URLs (manifest `url_credentials_stripped`: how many samples' URLs had
    a `user:password@` part, removed before publishing); nothing for a manifest that does not say."""
    n = manifest.get("url_credentials_stripped")
    if not isinstance(n, int) or isinstance(n, bool):
        return []
    done = (f"the URLs of {_plural(n, 'sample')} had a `user:password@` part (credentials), removed before "
            "publishing" if n else "none of this release's URLs had a `user:password@` part (credentials)")
    return ["", f"URLs carry no credentials: {done}. Such a part is always removed from `url`, `source_url` and "
                "the webdataset JSON; the rest of each URL is unchanged."]


def _distribution_section(m: pd.DataFrame, plots: dict[str, Path | None], n_total: int) -> list[str]:
    lines = ["## Distributions", ""]
    basis = f"over all {len(m):,} published samples" if len(m) >= n_total else \
        f"over {len(m):,} of the {n_total:,} published samples"
    lines += [f"Computed {basis}. Attribute plots show the primary face; they are model predictions, not ground "
              "truth, and grey bars count samples whose model was not confident enough to give a label.", ""]
    notes = {
        "resolution": ("Image resolution", lambda: f"median {m['width'].median():.0f} x {m['height'].median():.0f} px, "
                       f"shorter side {m['short_side'].min():.0f}-{m['short_side'].max():.0f} px"),
        "faces_per_image": ("Faces per image", lambda: f"mean {m['n_faces'].mean():.2f}; "
                            f"{_plural(int((m['n_faces'] > 1).sum()), 'image')} with more than one face"),
        "face_size": ("Primary face size", lambda: f"median shorter side {m['face_side'].median():.0f} px"
                      if m["face_side"].notna().any() else ""),
        "age": ("Estimated age", lambda: f"median {m['age'].median():.0f} years; "
                f"{_plural(int(m['age'].isna().sum()), 'sample')} without a confident age"),
        "gender": ("Estimated gender", lambda: ", ".join(f"{k} {v:,}" for k, v in
                                                        Counter(m["gender"].dropna()).most_common())),
        "expression": ("Expression", lambda: ", ".join(f"{k} {v:,}" for k, v in
                                                      Counter(m["expression"].dropna()).most_common())),
        "caption_length": ("Caption length", lambda: f"face captions: mean {m['caption_words'].mean():.1f} words"
                           if m["caption_words"].notna().any() else ""),
    }
    skipped = []
    for key, (title, note) in notes.items():
        path = plots.get(key)
        if path is None:
            skipped.append(title.lower())
            continue
        text = note()
        lines += [f"### {title}", "", f"![{title}]({CARD_DIR}/{path.name})", ""] + ([text, ""] if text else [])
    if skipped:
        lines += [f"Not plotted (no values in this release): {', '.join(skipped)}.", ""]
    return lines


def _caption_section(summary: dict, examples: list[tuple[bytes, str]]) -> list[str]:
    stats = summary.get("caption_stats")
    lines = ["## Captions", ""]
    if not stats:
        return lines + ["The caption stage did not run: samples carry their web captions only.", ""]
    described = {
        "n": "face captions",
        "vocabulary": "distinct words",
        "distinct_1": "distinct words / all words",
        "distinct_2": "distinct word pairs / all word pairs (within a caption)",
        "mean_words": "mean length in words",
        "max_words": "longest caption in words",
        "duplicate_share": "share of captions repeating an earlier one exactly",
        "attributes_per_caption": "mean confident attributes behind a caption",
    }
    rows = [[key, stats[key] if stats[key] is not None else "n/a", meaning]
            for key, meaning in described.items() if key in stats]
    lines += _table(["statistic", "value", "meaning"], rows)
    shown = [c for _, c in examples if c][:5]
    if shown:
        lines += ["", "Example face captions:", ""] + [f"- {c.strip()}" for c in shown]
    return lines + [""]


def _models_section(summary: dict, manifest: dict) -> list[str]:
    models = _models(summary, manifest)
    if not models:
        return ["## Models", "", "No models were recorded.", ""]
    rows = [[m["role"], m["name"], m["version"],
             ("**" + m["licence"] + " (non-commercial)**") if _NON_COMMERCIAL.search(m["licence"]) else m["licence"],
             m["source"]] for m in models]
    return ["## Models", "", "Every model that produced a column of this dataset, with the licence of its weights:",
            ""] + _table(["role", "model", "version", "licence", "source"], rows) + [""]


def _licence_section(summary: dict, manifest: dict) -> list[str]:
    flagged = non_commercial_models(summary, manifest)
    lines = ["## Licence", "",
             "`license: other`. This dataset collects **web images whose licences are their owners'**: the images "
             "and the web captions (alt text) remain under the copyright and licence of whoever published them, "
             "which this release does not change. It gives no right to redistribute or use an image beyond what "
             "its owner allows and the law of your jurisdiction permits (e.g. text-and-data-mining exceptions). "
             "Check each image's terms before any use beyond research.", ""]
    if flagged:
        lines += ["Boxes, keypoints, identity clusters and other columns were produced by models whose licences are "
                  "**non-commercial research only**: "
                  + "; ".join(f"{m['name']} ({m['licence']})" for m in flagged)
                  + ". Treat the dataset as for non-commercial research unless you have cleared that for your use.",
                  ""]
    lines += ["The other models' licences are in the Models table; the face captions are machine-generated.", ""]
    return lines


def _loading_section(repo: str, splits: list[str], manifest: dict) -> list[str]:
    split = splits[0] if splits else "train"
    patterns = {s: _data_pattern(s, manifest) for s in splits or ["train"]}
    tars = [f["path"] for f in _manifest_files(manifest) if f["path"].endswith(".tar")]
    split_tars = sorted(p for p in tars if _file_split({"path": p}) == split) or sorted(tars)
    lines = ["## How to load", "", "With 🤗 Datasets (the `configs` in this card's header map the splits to files):",
             "", "```python", "from datasets import load_dataset", "",
             f'ds = load_dataset("{repo}")  # or a local copy: load_dataset("path/to/this/folder")',
             f'row = ds["{split}"][0]',
             'print(row["face_caption"], row["caption"])', "",
             "# or the parquet files alone:",
             'ds = load_dataset("parquet", data_files={'
             + ", ".join(f'"{s}": "{p}"' for s, p in patterns.items()) + "})",
             "```", ""]
    lines += ["With webdataset (each sample is `KEY.jpg|png|webp`, `KEY.txt`, its caption, and `KEY.json`, its "
              "other columns):", "", "```python",
              "import webdataset as wds", ""]
    if split_tars:
        urls = _brace_pattern(split_tars)
        lines += [f'urls = "https://huggingface.co/datasets/{repo}/resolve/main/{urls}"',
                  "ds = (wds.WebDataset(urls, shardshuffle=False)",
                  '      .decode("pil")',
                  '      .to_tuple("jpg;png;webp", "txt", "json"))',
                  "for image, text, record in ds:",
                  '    print(image.size, text, record.get("face_caption"))',
                  "    break"]
    else:
        lines += ["# this release ships no tars; the builder's run directory holds webdataset shards:",
                  'ds = wds.WebDataset("RUN/shards/{00000..00003}.tar", shardshuffle=False).decode("pil")',
                  "for sample in ds:",
                  '    print(sample["__key__"], sample.get("txt"), sample["json"])',
                  "    break"]
    return lines + ["```", ""]


def _brace_pattern(paths: list[str]) -> str:
    """'dir/train-{00000..00003}.tar' for consecutive numbered files, else the first path."""
    parsed = [re.fullmatch(r"(.*?)(\d+)(\.tar)", p) for p in paths]
    if len(paths) > 1 and all(parsed):
        prefixes = {m.group(1) for m in parsed}
        numbers = sorted(m.group(2) for m in parsed)
        widths = {len(n) for n in numbers}
        ints = [int(n) for n in numbers]
        if len(prefixes) == 1 and len(widths) == 1 and ints == list(range(ints[0], ints[0] + len(ints))):
            return f"{parsed[0].group(1)}{{{numbers[0]}..{numbers[-1]}}}.tar"
    return paths[0]


def _ethics_section(summary: dict, config: dict) -> list[str]:
    identity = _stage(summary, "identity") or {}
    download = _stage(summary, "download") or {}
    optout_faces = identity.get("n_optout_faces")
    optout_images = (identity.get("dropped_by_status") or {}).get("optout_match")
    site_optouts = (download.get("dropped_by_status") or {}).get("opted_out")
    thresholds = {k: v for k, v in _thresholds(config, summary).items() if "=" not in k}
    default = _get(config, "attributes.min_confidence", 0.85)
    special = {k: v for k, v in thresholds.items() if v != default}
    lines = ["## Limitations and ethics", ""]
    lines.append("- **Faces are personal data.** Every image shows real people who did not consent to this dataset. "
                 "Do not use it to identify, track or profile people, for surveillance, or to infer sensitive "
                 "traits; identity clusters are numbers, not names, and must not be linked to names.")
    lines.append("- **No names in face captions.** Face captions are composed only from attribute predictions and "
                 "never name anyone (a rewrite adding a name-like word is rejected). The web `caption` column is the "
                 "original alt text, unedited: it may contain names and other personal information.")
    if optout_faces is not None or site_optouts is not None:
        parts = []
        if site_optouts is not None:
            parts.append(f"{_plural(site_optouts, 'image')} dropped because the site opted out of AI use "
                         "(X-Robots-Tag noai/noimageai)")
        if optout_faces is not None:
            parts.append(f"{_plural(optout_faces, 'face')} matched the opt-out gallery of people who asked to "
                         f"be left out, removing {_plural(optout_images or 0, 'image')} (only counts are recorded, "
                         "never who)")
        lines.append("- **Opt-out.** " + "; ".join(parts) + ". To be removed from a future release, ask the "
                     "maintainers: a photo of your face added to the opt-out gallery removes every image it matches.")
    lines.append(f"- **Attributes are model predictions**, kept only at confidence {_fmt(default)} or more"
                 + (" (" + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(special.items())) + ")" if special else "")
                 + "; below that the value is null. They carry the models' errors and biases and were not checked "
                 "by people.")
    lines.append("- **Age and gender are model estimates from appearance, not self-reported.** Gender is a binary "
                 "classifier's output and says nothing about how a person identifies; estimated ages are often off "
                 "by years, more so for children, older people and under-represented groups.")
    lines.append("- **Web bias.** The images come from whatever the input URLs held: their demographics, settings "
                 "and photographic styles follow the web and the input list, not the world. Face detection and "
                 "attribute models work less well on some groups, so filtering itself may skew who is included.")
    lines.append("- **Link rot and takedown.** Images can disappear from or change at their URLs; a removal request "
                 "for an image or a person should be honoured in the next release.")
    return lines + [""]


# --------------------------------------------------------------------------------------------
# The card


def write_dataset_card(
    dest: Path,
    *,
    name: str,
    summary: dict,
    config: dict,
    manifest: dict,
    samples: pd.DataFrame,
    examples: list[tuple[bytes, str]],
    repo_id: str | None = None,
) -> Path:
    """Write DEST/README.md (a Hugging Face dataset card) and its pictures under DEST/card/; return
    the README's path.

    `summary` is the run's summary.json, `config` the run config as a dict, `manifest` the release
    manifest (read when present: fingerprint, code_version, files, splits, data_files, features,
    models, repo_id, pretty_name), `samples` the published records (or a sample of them; status
    'ok' rows only are plotted when a status column is present) and `examples` (image bytes,
    caption) pairs for the sample grid. `repo_id` (else manifest['repo_id'], else `name` when it
    has a slash) is used in the loading examples.
    """
    dest = Path(dest)
    card_dir = dest / CARD_DIR
    card_dir.mkdir(parents=True, exist_ok=True)
    if "status" in samples.columns:
        samples = samples[samples["status"] == "ok"]
    samples = samples.reset_index(drop=True)
    summary, config, manifest = _plain(summary or {}), _plain(config or {}), _plain(manifest or {})

    m = measurements(samples)
    plots: dict[str, Path | None] = {
        "funnel": _plot_funnel(summary, card_dir / "funnel.png"),
        "resolution": _plot_resolution(m, card_dir / "resolution.png"),
        "faces_per_image": _plot_faces_per_image(m, card_dir / "faces_per_image.png"),
        "face_size": _plot_face_size(m, card_dir / "face_size.png"),
        "age": _plot_age(m, card_dir / "age.png"),
        "gender": _plot_category(m, "gender", ATTRIBUTES["gender"].values, "estimated gender of the primary face "
                                 "(model prediction)", card_dir / "gender.png"),
        "expression": _plot_category(m, "expression", ATTRIBUTES["expression"].values,
                                     "expression of the primary face (model prediction)", card_dir / "expression.png"),
        "caption_length": _plot_caption_length(m, card_dir / "caption_length.png"),
    }
    grid = None
    if examples:
        from facedata.report.contact_sheet import make_contact_sheet

        grid = make_contact_sheet(
            [(data, caption) for data, caption in examples], card_dir / "samples.png",
            title=f"{_pretty_name(name, manifest)}: example images and their face captions",
            thumb=224, columns=4, max_items=16,
        )

    meta = card_metadata(name, summary, config, manifest, samples)
    total = _total(summary, manifest, samples)
    repo = _repo_id(name, manifest, repo_id)
    splits = _split_counts(summary, manifest, samples)
    flagged = non_commercial_models(summary, manifest)
    fingerprint, given = _fingerprint(manifest)
    faces_stage = _stage(summary, "faces") or {}
    identity = _stage(summary, "identity") or {}

    body: list[str] = [f"# {meta['pretty_name']}", ""]
    if flagged:
        body += ["> **⚠️ Non-commercial research only.** Parts of this dataset were produced with models licensed "
                 "for non-commercial research only: "
                 + "; ".join(f"**{m_['name']}** ({m_['licence']})" for m_ in flagged)
                 + ". The images remain under their owners' licences. See [Licence](#licence).", ""]
    else:
        body += ["> **Licence:** the images remain under their owners' licences (web data). See [Licence](#licence).",
                 ""]
    body += [_description(total, summary), ""]
    glance = [["samples (images)", f"{total:,}"]]
    if summary.get("n_samples"):
        glance.append(["input rows", f"{summary['n_samples']:,}"])
    if faces_stage.get("n_faces") is not None:
        glance.append(["faces detected (in images that reached the face stage)", f"{faces_stage['n_faces']:,}"])
    if identity.get("n_identities") is not None:
        glance.append(["identity clusters", f"{identity['n_identities']:,}"])
    if splits:
        glance.append(["splits", ", ".join(f"{s} {v['images']:,}" if v["images"] is not None else s
                                           for s, v in splits.items())])
    if (summary.get("caption_stats") or {}).get("mean_words") is not None:
        glance.append(["face caption length", f"{summary['caption_stats']['mean_words']} words on average"])
    glance.append(["code version", f"`{_code_version(manifest, summary)}`"])
    glance.append(["manifest fingerprint", f"`{fingerprint}`"])
    body += _table(["", ""], glance) + [""]
    if grid:
        body += [f"![Example images with their face captions]({CARD_DIR}/{grid.name})", ""]

    body += ["## How it was made", "",
             "A `facedata` run: each stage reads the previous one's records and gives every sample a status; only "
             "samples with status `ok` after the last stage are published.", ""]
    body += [f"{i}. {_stage_text(stage, config, summary)}" for i, stage in enumerate(summary.get("funnel") or [], 1)]
    body += [""]
    body += _funnel_section(summary, config, plots["funnel"]) + [""]
    body += _splits_section(summary, manifest, samples) + [""]
    fields = _fields_section(samples, manifest)
    body += fields + ([""] if fields else [])
    body += _distribution_section(m, plots, total)
    body += _caption_section(summary, examples)
    body += _models_section(summary, manifest)
    body += _reliability_section(summary, config)
    body += _licence_section(summary, manifest)
    body += _loading_section(repo, list(splits), manifest)
    body += ["## Build config", "", "The run's exact configuration:", "", "```yaml",
             yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip(), "```", "",
             f"- code version: `{_code_version(manifest, summary)}`",
             f"- manifest fingerprint: `{fingerprint}`"
             + ("" if given else " (SHA-256 of the manifest's canonical JSON; the manifest recorded none)"), ""]
    body += _ethics_section(summary, config)

    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    text = f"---\n{front}---\n\n" + "\n".join(body).rstrip() + "\n"
    readme = dest / README
    with atomic_path(readme) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
    _remove_stale(card_dir, {p.name for p in card_images(dest)})
    return readme


def _remove_stale(card_dir: Path, referenced: set[str]) -> None:
    """PNGs left in card/ by an earlier card that this one no longer shows."""
    for path in card_dir.glob("*.png"):
        if path.name not in referenced:
            path.unlink(missing_ok=True)


_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)|<img[^>]*\bsrc=[\"']([^\"']+)[\"']", re.IGNORECASE)


def card_images(dest: Path) -> list[Path]:
    """Every local image DEST/README.md references (markdown or <img>), as paths under DEST, in order."""
    dest = Path(dest)
    text = (dest / README).read_text(encoding="utf-8")
    found: list[Path] = []
    for match in _IMAGE_LINK.finditer(text):
        link = match.group(1) or match.group(2)
        if re.match(r"[a-z]+://", link):
            continue
        path = dest / link
        if path not in found:
            found.append(path)
    return found
