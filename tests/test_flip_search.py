"""Text-to-image search and CLIP scores with a small FLIP model trained on the demo's published
dataset until it has memorised the train captions (60 steps of 16 on 30 samples, ~15 s)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from facedata.core.errors import UserError
from facedata.flip.config import train_config_from_dict
from facedata.pipeline import run_shard
from facedata.core.run_layout import RunLayout
from tests.conftest import REPO

SMALL_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _train_config(data_dir: Path, out_dir: Path, steps: int = 60) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "flip_tiny.yaml").read_text())  # use_crops: true
    raw["data"]["dir"] = str(data_dir)
    raw["model"]["config"] = SMALL_MODEL
    raw["model"]["augment"] = {"enabled": False}
    raw["training"].pop("epochs")
    raw["training"].update(steps=steps, lr=2e-3, warmup_steps=10, workers=0, threads=1, seed=0)
    raw["output"] = {"dir": str(out_dir), "checkpoint_every": 10_000, "keep_last": 1}
    return raw


@pytest.fixture(scope="module")
def trained(demo_run, tmp_path_factory) -> dict:
    """A private copy of the demo's published dataset and a FLIP run trained on its train split."""
    from facedata.flip.train import train

    root = tmp_path_factory.mktemp("flip_search")
    dataset = root / "dataset"
    shutil.copytree(demo_run.parent / "dataset", dataset)
    run = root / "run"
    metrics = train(train_config_from_dict(_train_config(dataset, run)), progress=False)
    return {"dataset": dataset, "run": run, "checkpoint": Path(metrics["checkpoint"]), "root": root}


@pytest.fixture(scope="module")
def ckpt(trained):
    from facedata.flip.embed import load_checkpoint

    return load_checkpoint(trained["run"], "cpu")


def _parser() -> argparse.ArgumentParser:
    from facedata.flip.search import add_search_parser

    parser = argparse.ArgumentParser(prog="facedata")
    add_search_parser(parser.add_subparsers(dest="command"))
    return parser


def _cli(capsys, *argv: str) -> dict:
    from facedata.flip.search import run_search_command

    args = _parser().parse_args(["search", *argv, "--workers", "0", "--no-progress", "--device", "cpu"])
    assert run_search_command(args) == 0
    return json.loads(capsys.readouterr().out)


def _train_captions(dataset: Path) -> dict[str, str]:
    import tarfile

    out = {}
    for tar in sorted((dataset / "webdataset").glob("train-*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".txt"):
                    out[m.name[:-4]] = t.extractfile(m).read().decode().strip()
    return out


def _mtimes(folder: Path) -> dict[str, int]:
    return {name: (folder / name).stat().st_mtime_ns for name in ("index.faiss", "keys.parquet", "meta.json")}


# --------------------------------------------------------------------------------------------- embed

def test_load_checkpoint_and_embed(trained, ckpt):
    from facedata.flip.embed import (
        embed_split,
        embed_texts,
        file_sha256,
        load_checkpoint,
    )

    assert ckpt.path == trained["checkpoint"] and ckpt.step == 60
    assert ckpt.sha256 == file_sha256(trained["checkpoint"]) and len(ckpt.short_hash) == 12
    assert ckpt.use_crops is True and not ckpt.model.training
    emb = embed_split(ckpt, trained["dataset"], "train", meta_fields=("url", "split"))
    assert emb.embeddings.shape == (30, 64) and emb.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb.embeddings, axis=1), 1, atol=1e-5)
    assert len(emb.keys) == len(emb.captions) == len(emb.meta["url"]) == 30
    assert set(emb.meta["split"]) == {"train"}
    text = embed_texts(ckpt, emb.captions)
    # memorised: every train caption is closest to its own image
    assert ((text @ emb.embeddings.T).argmax(1) == np.arange(30)).mean() >= 0.9
    assert embed_texts(ckpt, []).shape == (0, 64)
    again = load_checkpoint(trained["checkpoint"], "cpu")  # the file itself, not the run folder
    np.testing.assert_allclose(embed_texts(again, emb.captions[:3]), text[:3], atol=1e-6)


def test_load_checkpoint_errors(tmp_path):
    from facedata.flip.embed import load_checkpoint

    with pytest.raises(UserError, match="no such file or folder"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UserError, match="without checkpoints"):
        load_checkpoint(tmp_path / "empty_run")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a facedata FLIP checkpoint") as err:
        load_checkpoint(tmp_path / "other.pt")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- search

def test_search_cli_finds_each_image_by_its_caption_and_reuses_the_index(trained, capsys):
    dataset, captions = trained["dataset"], _train_captions(trained["dataset"])
    key, caption = min(captions.items())
    out = trained["root"] / "q1"
    first = _cli(capsys, caption, "--dataset", str(dataset), "--checkpoint", str(trained["run"]), "--k", "5",
                 "--out", str(out))
    assert first["index"]["built"] is True and first["index"]["n"] == 38
    assert first["splits"] == ["train", "validation", "test"]
    top = first["results"][0]
    assert top["key"] == key and top["face_caption"] == caption and top["split"] == "train"
    assert top["url"].startswith("http") and 0.3 < top["score"] <= 1.0001
    assert [r["rank"] for r in first["results"]] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in first["results"]] == sorted((r["score"] for r in first["results"]), reverse=True)
    assert json.loads((out / "results.json").read_text())["results"] == first["results"]
    from PIL import Image

    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 5 * 100

    folder = Path(first["index"]["folder"])
    sha = first["checkpoint_sha256"]
    assert folder == dataset / "search" / sha[:12] / "all"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["identity"]["checkpoint_sha256"] == sha
    assert meta["identity"]["dataset"]["manifest_fingerprint"] == \
        json.loads((dataset / "manifest.json").read_text())["fingerprint"]
    before = _mtimes(folder)

    # Every train caption finds its own image first, through the cached index.
    from facedata.flip.embed import load_checkpoint
    from facedata.flip.search import load_or_build_index, search_index

    ckpt = load_checkpoint(trained["run"], "cpu")
    si = load_or_build_index(ckpt, dataset)
    assert si.built is False and len(si) == 38
    hits = sum(search_index(si, ckpt, c, k=1)[0]["key"] == k for k, c in captions.items())
    assert hits >= 27, f"{hits}/30 train captions found their own image first"

    second = _cli(capsys, "a smiling woman with glasses", "--dataset", str(dataset),
                  "--checkpoint", str(trained["checkpoint"]), "--k", "100")
    assert second["index"]["built"] is False and len(second["results"]) == 38  # k clamped to the index
    assert _mtimes(folder) == before
    default_out = Path(second["results_json"]).parent
    assert default_out.parent == folder / "queries" and (default_out / "contact_sheet.png").is_file()


def test_one_split_has_its_own_index(trained, ckpt):
    from facedata.flip.search import load_or_build_index

    si = load_or_build_index(ckpt, trained["dataset"], ["validation"])
    assert si.folder.name == "validation" and len(si) == 4 and set(si.keys["split"]) == {"validation"}
    with pytest.raises(UserError, match=r"no nope-\*\.tar shards \(splits there: train, validation, test\)"):
        load_or_build_index(ckpt, trained["dataset"], ["nope"])


def test_changed_checkpoint_or_dataset_rebuilds(trained, capsys, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(trained["dataset"], dataset, ignore=shutil.ignore_patterns("search"))
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    query = ["a man with a beard", "--dataset", str(dataset), "--checkpoint", str(run), "--k", "3"]
    first = _cli(capsys, *query)
    folder = Path(first["index"]["folder"])
    assert first["index"]["built"] is True
    assert _cli(capsys, *query)["index"]["built"] is False
    before = _mtimes(folder)

    # The same checkpoint path with other weights: another hash, its own freshly built index.
    path = Path(first["checkpoint"])
    state = torch.load(path, map_location="cpu", weights_only=True)
    name = next(k for k in state["state_dict"] if k.startswith("visual.") and k.endswith("weight"))
    state["state_dict"][name] = state["state_dict"][name] * 1.5
    torch.save(state, path)
    changed = _cli(capsys, *query)
    assert changed["checkpoint_sha256"] != first["checkpoint_sha256"]
    assert changed["index"]["built"] is True and Path(changed["index"]["folder"]) != folder
    assert _mtimes(folder) == before  # the old checkpoint's index is left alone

    # A changed dataset (a tar rewritten) rebuilds in place; --rebuild forces it.
    tar = dataset / "webdataset" / "test-00000.tar"
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    new_folder = Path(changed["index"]["folder"])
    mid = _mtimes(new_folder)
    rebuilt = _cli(capsys, *query)
    assert rebuilt["index"]["built"] is True and Path(rebuilt["index"]["folder"]) == new_folder
    assert _mtimes(new_folder)["index.faiss"] != mid["index.faiss"]
    assert _cli(capsys, *query)["index"]["built"] is False
    assert _cli(capsys, *query, "--rebuild")["index"]["built"] is True
    assert not list(new_folder.glob(".*.tmp"))


def test_search_errors_are_one_line(trained, tmp_path):
    from facedata.flip.search import run_search, run_search_command

    cases = [
        (("  ", trained["dataset"], trained["run"]), "query: empty"),
        (("a face", tmp_path / "nope", trained["run"]), "no such folder"),
        (("a face", tmp_path, trained["run"]), "no webdataset/ folder"),
        (("a face", trained["dataset"], tmp_path / "none.pt"), "no such file or folder"),
    ]
    for (query, dataset, checkpoint), message in cases:
        with pytest.raises(UserError, match=message) as err:
            run_search(query, dataset, checkpoint, out=tmp_path / "out")
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"--split: .*no dev-\*\.tar shards \(splits there: train, validation, test\)"):
        run_search("a face", trained["dataset"], tmp_path / "none.pt", split="dev")
    with pytest.raises(UserError, match="--k"):
        run_search("a face", trained["dataset"], trained["run"], k=0)
    args = _parser().parse_args(["search", "", "--dataset", str(tmp_path / "nope"), "--checkpoint", "x.pt"])
    with pytest.raises(UserError, match="query: empty"):
        run_search_command(args)
    with pytest.raises(SystemExit):
        _parser().parse_args(["search", "q", "--dataset", "d", "--checkpoint", "c", "--k", "0"])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- relevance

def test_clip_scores_on_the_trained_model(trained, ckpt):
    import tarfile

    from facedata.flip.search import clip_scores

    images, captions, boxes = [], [], []
    with tarfile.open(trained["dataset"] / "webdataset" / "train-00000.tar") as t:
        members = {m.name: m for m in t}
        for name in sorted(members):
            if name.endswith(".txt"):
                key = name[:-4]
                image = next(members[key + ext] for ext in (".jpg", ".png", ".webp") if key + ext in members)
                images.append(t.extractfile(image).read())
                captions.append(t.extractfile(members[name]).read().decode().strip())
                faces = json.loads(t.extractfile(members[key + ".json"]).read())["faces"]
                boxes.append(next(f for f in faces if f["primary"])["bbox"])
    # The checkpoint was trained on face crops: score the crops, as training saw them.
    scores = clip_scores(ckpt, images, captions, boxes=boxes)
    assert scores.shape == (len(images),) and scores.dtype == np.float32
    assert np.all(np.abs(scores) <= 1.0001)
    shuffled = clip_scores(ckpt, images, captions[1:] + captions[:1], boxes=boxes)
    assert scores.mean() > shuffled.mean() + 0.3
    assert (scores > shuffled).all()
    # The boxes path embeds what the training loader reads in crops mode.
    from facedata.flip.embed import embed_images, embed_split

    split = embed_split(ckpt, trained["dataset"], "train")
    order = [split.captions.index(c) for c in captions]
    agreement = (embed_images(ckpt, images, boxes=boxes) * split.embeddings[order]).sum(1)
    # the loader decodes JPEGs at a reduced scale (here to ~32 px across the crop): close, not equal
    assert agreement.min() > 0.9 and np.median(agreement) > 0.99
    whole = clip_scores(ckpt, images, captions)  # whole images: runs, scores lower
    assert whole.shape == scores.shape and whole.mean() < scores.mean()
    assert clip_scores(ckpt, [], []).shape == (0,)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        clip_scores(ckpt, images[:2], captions[:1])


def test_face_region_matches_the_training_crop():
    from facedata.flip.data import FaceTextDataset
    from facedata.flip.embed import face_region

    dataset = FaceTextDataset.__new__(FaceTextDataset)
    dataset.crop_scale = 1.7
    for box, w, h in [([10, 20, 50, 90], 100, 100), ([0, 0, 30, 10], 40, 40), ([60, 5, 99, 45], 100, 60)]:
        assert face_region(box, w, h, 1.7) == dataset.crop_region([float(v) for v in box], w, h)


def test_clip_scores_on_an_untrained_tiny_model():
    from PIL import Image

    from facedata.flip.config import ModelSection
    from facedata.flip.embed import embed_images, embed_texts
    from facedata.flip.model import build_flip_model
    from facedata.flip.search import clip_scores

    torch.manual_seed(0)
    flip = build_flip_model(ModelSection(config=SMALL_MODEL))
    images = [Image.new("RGB", (40, 50), c) for c in ("red", "blue", "white")]
    captions = ["a red face", "a blue face", "a white face"]
    scores = clip_scores(flip, images, captions)
    expected = (embed_images(flip, images) * embed_texts(flip, captions)).sum(1)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert flip.model.training  # left as it was


def test_relevance_filter():
    from facedata.flip.search import relevance_filter

    scores = np.array([0.1, 0.35, np.nan, 0.28, 0.5], np.float32)
    assert relevance_filter(scores, 0.28).tolist() == [False, True, False, True, True]
    assert relevance_filter(scores, keep_fraction=0.5).tolist() == [False, True, False, False, True]
    assert relevance_filter(scores, 0.4, keep_fraction=0.75).tolist() == [False, False, False, False, True]
    assert relevance_filter([], 0.3).tolist() == []
    with pytest.raises(ValueError):
        relevance_filter(scores)
    with pytest.raises(ValueError):
        relevance_filter(scores, keep_fraction=0)


def test_relevance_filter_in_the_caption_stage(trained, demo_run, tmp_path):
    """relevance.checkpoint: the caption stage scores each captioned image against its face caption
    with the FLIP model and drops those under relevance.min_score (status low_relevance)."""
    import pyarrow.parquet as pq

    from facedata.core import records
    from facedata.core.config import load_config

    def caption_run(min_score: float) -> list[dict]:
        run = tmp_path / f"run_{min_score}"
        for part in ("shards", "faces", "identity"):
            shutil.copytree(demo_run / part, run / part)
        cfg = load_config(demo_run / "config.yaml", [f"relevance.checkpoint={trained['run']}",
                                                      f"relevance.min_score={min_score}"])
        shard_ids = sorted(int(p.name[:5]) for p in (run / "identity").glob("0*.parquet"))
        for shard in shard_ids:
            run_shard("captions", shard, cfg, run, progress=False)
        captions = RunLayout(run).step_dir("captions")
        return [r for p in sorted(captions.glob("0*.parquet")) for r in pq.read_table(p).to_pylist()]

    everything = caption_run(-1.0)
    scored = [r for r in everything if r["clip_score"] is not None]
    assert scored and all(r["face_caption"] for r in scored)
    assert all(r["status"] == records.OK for r in scored)
    assert all(r["clip_score"] is None for r in everything if r["face_caption"] is None)
    cut = float(np.median([r["clip_score"] for r in scored]))
    filtered = {r["key"]: r for r in caption_run(cut)}
    for row in scored:
        expected = records.OK if row["clip_score"] >= cut else records.LOW_RELEVANCE
        assert filtered[row["key"]]["status"] == expected
    assert 0 < sum(r["status"] == records.LOW_RELEVANCE for r in filtered.values()) < len(scored)
