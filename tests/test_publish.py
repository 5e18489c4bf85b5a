"""Publishing a real finished run (the embedded demo): parquet read back with `datasets`, webdataset tars
read back with `webdataset`, embeddings, manifest, idempotent republish, refusing and overwriting, partial
runs and face crops."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from facedata import publish
from facedata.errors import UserError
from facedata.imaging import decode_rgb
from facedata.publish import crop_box, publish_run
from tests.conftest import facedata_cmd

pytestmark = pytest.mark.slow

SPLITS = ("train", "validation", "test")
PER_SHARD = 8  # the demo keeps 38 samples (train 30): several output shards per split


def run_records(run_dir: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """The run's kept records by key (status ok in captions/NNNNN.parquet)."""
    kept = {}
    for path in sorted((run_dir / "captions").glob("[0-9]*.parquet")):
        if path.stem in skip:
            continue
        for r in pq.read_table(path).to_pylist():
            if r["status"] == "ok":
                kept[r["key"]] = r
    return kept


def fast_card(dest: Path, **kwargs) -> Path:
    (dest / "README.md").write_text(f"# {kwargs['name']}\n")
    return dest / "README.md"


@pytest.fixture
def quick_card(monkeypatch):
    """The dataset card replaced by a one-line README (its plots take a few seconds)."""
    import facedata.card

    monkeypatch.setattr(facedata.card, "write_dataset_card", fast_card)


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def published(demo_run, tmp_path_factory):
    """The demo run published once with embeddings, the real dataset card's inputs recorded."""
    import facedata.card

    calls = []
    real = facedata.card.write_dataset_card

    def spy(dest, **kwargs):
        calls.append(kwargs)
        return real(dest, **kwargs)

    dest = tmp_path_factory.mktemp("published") / "demo-faces"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(facedata.card, "write_dataset_card", spy)
        manifest = publish_run(demo_run, dest, samples_per_shard=PER_SHARD, embeddings=True, progress=False)
    assert manifest["status"] == "written" and len(calls) == 1
    return dest, manifest, calls[0]


def test_load_dataset_round_trip(published, demo_run, tmp_path):
    import datasets

    dest, manifest, _ = published
    expected = run_records(demo_run)
    assert len(expected) == 38
    counts = {s: sum(r["split"] == s for r in expected.values()) for s in SPLITS}
    for split, n in counts.items():
        n_shards = -(-n // PER_SHARD)
        names = sorted(p.name for p in (dest / "data").glob(f"{split}-*.parquet"))
        assert names == [f"{split}-{i:05d}-of-{n_shards:05d}.parquet" for i in range(n_shards)]
        assert manifest["splits"][split]["num_examples"] == n

    by_folder = datasets.load_dataset(str(dest), cache_dir=str(tmp_path / "hf"))  # the card's YAML configs
    by_parquet = datasets.load_dataset("parquet", data_dir=str(dest / "data"), cache_dir=str(tmp_path / "hf2"))
    for loaded in (by_folder, by_parquet):
        assert sorted(loaded) == sorted(SPLITS)
        assert {s: loaded[s].num_rows for s in SPLITS} == counts
        assert isinstance(loaded["train"].features["image"], datasets.Image)
    first = by_folder["train"][0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (first["width"], first["height"])

    stored = {}
    for tar_path in sorted((demo_run / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            stored.update((m.name.split(".")[0], tar.extractfile(m).read()) for m in tar.getmembers()
                          if m.name.split(".")[0] in expected and not m.name.endswith((".txt", ".json")))
    identities: dict[str, set] = {s: set() for s in SPLITS}
    seen = []
    for split in SPLITS:
        rows = by_folder[split].cast_column("image", datasets.Image(decode=False))
        for row in rows:
            rec = expected[row["key"]]
            seen.append(row["key"])
            assert row["split"] == rec["split"] == split
            assert (row["face_caption"], row["caption"], row["url"], row["source_url"]) == \
                (rec["face_caption"], rec["caption"], rec["url"], rec["url"])
            assert (row["width"], row["height"], row["n_faces"], row["identity_id"], row["source_sha256"]) == \
                (rec["width"], rec["height"], rec["n_faces"], rec["identity_id"], rec["sha256"])
            assert row["license"] is None  # the demo corpus has no licence column
            image = row["image"]["bytes"]
            assert hashlib.sha256(image).hexdigest() == row["sha256"]
            assert image == stored[row["key"]]  # the run's stored image, byte for byte
            with Image.open(io.BytesIO(image)) as im:
                assert im.size == (rec["width"], rec["height"])
            assert len(row["faces"]) == len(rec["faces"]) == rec["n_faces"]
            described = {a["face"]: a for a in rec["face_attributes"]}
            for i, (face, src) in enumerate(zip(row["faces"], rec["faces"])):
                assert np.allclose(face["bbox"], src["bbox"]) and np.allclose(face["landmarks"], src["kps"])
                assert face["score"] == pytest.approx(src["score"]) and face["primary"] == src["primary"]
                ident = rec["face_identity_ids"][i]
                assert face["identity_id"] == (ident if ident >= 0 else None)
                if i in described:
                    assert face["attributes"] == described[i]["values"]
                    assert face["confidences"] == pytest.approx(described[i]["confidences"])
                else:
                    assert face["attributes"] is None and face["confidences"] is None
            assert row["faces"][rec["primary_face"]]["primary"]
            identities[split].add(row["identity_id"])
    assert sorted(seen) == sorted(expected)
    assert not identities["train"] & identities["validation"]
    assert not identities["train"] & identities["test"]
    assert not identities["validation"] & identities["test"]


def test_webdataset_tars_hold_the_same_samples(published):
    import webdataset as wds

    dest, _, _ = published
    for split in SPLITS:
        parquet_rows = []
        for path in sorted((dest / "data").glob(f"{split}-*.parquet")):
            parquet_rows += pq.read_table(path).to_pylist()
        tars = sorted(str(p) for p in (dest / "webdataset").glob(f"{split}-*.tar"))
        assert len(tars) == len(list((dest / "data").glob(f"{split}-*.parquet")))
        samples = list(wds.WebDataset(tars, shardshuffle=False))
        assert [s["__key__"] for s in samples] == [r["key"] for r in parquet_rows]  # same order too
        for s, row in zip(samples, parquet_rows):
            image = row.pop("image")
            key, ext = image["path"].rsplit(".", 1)
            assert key == row["key"] and ext in ("jpg", "png", "webp") and s[ext] == image["bytes"]
            assert s["txt"].decode() == row["face_caption"]
            assert json.loads(s["json"]) == row


def test_embeddings_follow_the_data_shards(published, demo_run):
    dest, manifest, _ = published
    expected = run_records(demo_run)
    for rel in manifest["files"]:
        if not rel.startswith("data/"):
            continue
        split, index = Path(rel).stem.split("-")[:2]
        keys = pq.read_table(dest / rel, columns=["key"]).column("key").to_pylist()
        order = pq.read_table(dest / "embeddings" / f"{split}-{index}.parquet").to_pylist()
        vectors = np.load(dest / "embeddings" / f"{split}-{index}.npy")
        assert vectors.dtype == np.float16 and vectors.shape == (len(keys), 512)
        assert [r["key"] for r in order] == keys
        for key, row, vector in zip(keys, order, vectors):
            rec = expected[key]
            assert row["face"] == rec["primary_face"]
            shard = next(p.stem for p in (demo_run / "captions").glob("[0-9]*.parquet")
                         if key in {r["key"] for r in pq.read_table(p, columns=["key"]).to_pylist()})
            run_vectors = np.load(demo_run / "faces" / f"{shard}.embeddings.npy")
            assert np.array_equal(vector, run_vectors[rec["faces"][rec["primary_face"]]["embedding_index"]])


def test_manifest_and_card(published, demo_run):
    dest, manifest, card = published
    on_disk = json.loads((dest / "manifest.json").read_text())
    assert on_disk == {k: v for k, v in manifest.items() if k != "status"}
    assert manifest["run_dir"] == str(demo_run.resolve())
    assert manifest["code"]["facedata"] and manifest["code"]["git_commit"]  # the repo is a git checkout
    assert manifest["config"]["identity"]["enabled"] is True
    assert manifest["models"]["detector"]["licence"]
    assert manifest["n_samples"] == 38 and manifest["skipped_shards"] == []
    assert manifest["crops"] == {"enabled": False}
    assert "README.md" in manifest["files"] and (dest / "README.md").exists()
    for rel, info in manifest["files"].items():
        data = (dest / rel).read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"]
    listed = set(manifest["files"]) | {"manifest.json"}
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == listed
    assert not list(dest.parent.glob(".demo-faces.*"))  # no temp folder left beside DEST

    samples = card["samples"]
    assert card["name"] == "demo-faces" and card["manifest"]["fingerprint"] == manifest["fingerprint"]
    assert card["summary"]["n_ok"] == 38 and card["config"] == manifest["config"]
    assert len(samples) == 38
    for column in ("split", "width", "height", "n_faces", "face_side", "age", "gender", "expression",
                   "caption_words"):
        assert column in samples.columns
    assert samples["split"].value_counts().to_dict() == {s: v["num_examples"] for s, v in manifest["splits"].items()}
    assert (samples["face_side"] > 0).all() and (samples["caption_words"] > 0).all()
    assert 1 <= len(card["examples"]) <= 12
    image, caption = card["examples"][0]
    assert isinstance(image, bytes) and caption in set(r["face_caption"] for r in run_records(demo_run).values())


def test_republish_is_idempotent(published, demo_run):
    dest, manifest, _ = published
    before = tree_state(dest)
    again = publish_run(demo_run, dest, samples_per_shard=PER_SHARD, embeddings=True, progress=False)
    assert again["status"] == "unchanged" and again["fingerprint"] == manifest["fingerprint"]
    assert tree_state(dest) == before


def test_other_content_is_refused_unless_overwrite(published, demo_run, tmp_path, quick_card):
    dest = tmp_path / "copy"
    shutil.copytree(published[0], dest)
    before = tree_state(dest)
    with pytest.raises(UserError, match=r"exists with different content; pass --overwrite") as err:
        publish_run(demo_run, dest, samples_per_shard=16, progress=False)
    assert "\n" not in str(err.value) and str(dest) in str(err.value)
    assert tree_state(dest) == before

    # A publish that dies before its end (here in the card) leaves DEST as it was and no temp folder;
    # a temp folder left by a killed publish is removed by the next one.
    import facedata.card

    def broken_card(dest, **kwargs):
        raise RuntimeError("killed")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(facedata.card, "write_dataset_card", broken_card)
        with pytest.raises(RuntimeError, match="killed"):
            publish_run(demo_run, dest, samples_per_shard=16, progress=False, overwrite=True)
    assert tree_state(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    (tmp_path / ".copy.publish-0123abcd" / "data").mkdir(parents=True)

    replaced = publish_run(demo_run, dest, samples_per_shard=16, progress=False, overwrite=True)
    assert replaced["status"] == "written" and replaced["fingerprint"] != published[1]["fingerprint"]
    assert sorted(p.name for p in (dest / "data").glob("train-*")) == \
        ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert not (dest / "embeddings").exists()
    assert json.loads((dest / "manifest.json").read_text())["fingerprint"] == replaced["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # the old folder and temp folder are gone

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("not a published dataset")
    with pytest.raises(UserError, match="exists with different content"):
        publish_run(demo_run, stray, progress=False)
    assert [p.name for p in stray.iterdir()] == ["notes.txt"]


def test_unfinished_shard_is_named_or_skipped(demo_run, tmp_path, quick_card):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / "captions" / "00001.stats.json").unlink()
    with pytest.raises(UserError) as err:
        publish_run(run, tmp_path / "out", progress=False)
    message = str(err.value)
    assert str(run / "captions" / "00001.stats.json") in message and "--skip-partial" in message
    assert "\n" not in message and not (tmp_path / "out").exists()

    manifest = publish_run(run, tmp_path / "out", skip_partial=True, progress=False)
    expected = run_records(run, skip=("00001",))
    assert manifest["skipped_shards"] == [{"shard": "00001", "missing": "captions/00001.stats.json"}]
    assert manifest["n_samples"] == len(expected) < 38
    keys = []
    for path in sorted((tmp_path / "out" / "data").glob("*.parquet")):
        keys += pq.read_table(path, columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(expected)

    with pytest.raises(UserError, match="not a run directory"):
        publish_run(tmp_path / "out", tmp_path / "out2", progress=False)
    with pytest.raises(UserError, match="outside the run directory"):
        publish_run(run, run / "published", progress=False)


def test_crops_give_the_primary_face(demo_run, tmp_path, quick_card):
    import webdataset as wds

    expected = run_records(demo_run)
    manifest = publish_run(demo_run, tmp_path / "crops", crops=True, samples_per_shard=64, progress=False)
    assert manifest["crops"]["enabled"] and manifest["crops"]["scale"] == publish.CROP_SCALE
    tars = sorted(str(p) for p in (tmp_path / "crops" / "webdataset").glob("*.tar"))
    whole_images = {}  # crops change only the tars: the parquet keeps the whole image
    for path in (tmp_path / "crops" / "data").glob("*.parquet"):
        rows = pq.read_table(path, columns=["key", "image"]).to_pylist()
        whole_images.update((r["key"], r["image"]["bytes"]) for r in rows)
    n = 0
    for sample in wds.WebDataset(tars, shardshuffle=False):
        n += 1
        rec = expected[sample["__key__"]]
        meta = json.loads(sample["json"])
        bbox = rec["faces"][rec["primary_face"]]["bbox"]
        box = crop_box(bbox, rec["width"], rec["height"])
        assert meta["crop_box"] == list(box) and meta["crop_face"] == rec["primary_face"]
        x1, y1, x2, y2 = box
        assert x1 <= bbox[0] and y1 <= bbox[1] and x2 >= bbox[2] and y2 >= bbox[3]  # the whole face
        side = 1.5 * max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        assert max(x2 - x1, y2 - y1) <= round(side) + 1
        if x1 > 0 and y1 > 0 and x2 < rec["width"] and y2 < rec["height"]:
            assert x2 - x1 == y2 - y1  # square unless clipped by the image border
        crop = Image.open(io.BytesIO(sample["jpg"]))
        assert crop.format == "JPEG" and crop.size == (x2 - x1, y2 - y1)
        full = decode_rgb(whole_images[rec["key"]], 10**9)
        assert full.size == (rec["width"], rec["height"])
        diff = np.abs(np.asarray(full.crop(box), np.int16) - np.asarray(crop.convert("RGB"), np.int16))
        assert diff.mean() < 4  # the same pixels, re-encoded
    assert n == 38



def test_licence_column_of_the_input_is_published():
    record = {"key": "000000007", "url": "https://example.org/a.jpg", "caption": "a face", "face_caption": "x",
              "width": 10, "height": 10, "n_faces": 0, "faces": [], "identity_id": None, "sha256": "ab",
              "licence": "CC-BY-4.0"}
    row = publish.sample_row(record, "train", b"image")
    assert row["license"] == "CC-BY-4.0" and row["source_url"] == record["url"]
    assert row["source_sha256"] == "ab" and row["sha256"] == hashlib.sha256(b"image").hexdigest()
    assert publish.sample_row({**record, "licence": None}, "train")["license"] is None


def test_cli_publishes_to_a_folder_and_plans_a_hub_upload(demo_run, tmp_path, cli_env):
    """`facedata publish`: a folder, then the same run planned for the Hub without a token or a
    network call (the Hub itself is unreachable here; the upload call is tested in test_hub.py)."""
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    env = {**cli_env, "HF_TOKEN": ""}
    dest = tmp_path / "out"
    proc = subprocess.run(facedata_cmd("publish", str(run), "--to", str(dest), "--no-progress"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = json.loads((dest / "manifest.json").read_text())["n_samples"]
    assert f"{n} samples" in proc.stdout and "written" in proc.stdout
    proc = subprocess.run(facedata_cmd("publish", str(run), "--repo", "someone/faces", "--dry-run", "--no-progress"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data/train-00000-of-00001.parquet" in proc.stdout and "commit" in proc.stdout
    assert (tmp_path / "run-published" / "manifest.json").exists()
    proc = subprocess.run(facedata_cmd("publish", str(run), "--to", "hf://models/a/b"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "hf://datasets/OWNER/NAME" in proc.stderr
